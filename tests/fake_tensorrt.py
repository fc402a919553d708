"""A stand-in for the ``tensorrt`` module: exactly the API surface sedeploy calls, executed through ONNX Runtime.

sedeploy's TensorRT backend cannot run on machines without TensorRT and a GPU, so its side of the contract is
proven against this module. The names, argument order and return types follow the TensorRT 10.x / 11.x Python
bindings (``python/src/infer/pyCore.cpp``, ``pyGraph.cpp``, ``parsers/onnx/pybind.cpp`` in NVIDIA/TensorRT):

- ``Builder(logger)``: ``create_network(flags=0)``, ``create_builder_config()``, ``create_optimization_profile()``,
  ``build_serialized_network(network, config) -> IHostMemory | None``;
- ``OnnxParser(network, logger)``: ``parse_from_file(model) -> bool``, ``num_errors``, ``get_error(index)``;
- ``INetworkDefinition``: ``num_inputs``, ``get_input(index) -> ITensor`` (``name``, ``shape``, ``dtype``);
- ``IBuilderConfig``: ``set_memory_pool_limit(pool, pool_size)``, ``profiling_verbosity`` (property),
  ``add_optimization_profile(profile) -> int``, ``create_timing_cache(serialized_timing_cache)``,
  ``set_timing_cache(cache, ignore_mismatch) -> bool``, ``get_timing_cache()``, ``get_flag(flag) -> bool``,
  ``set_flag(flag)`` (recorded: sedeploy must never call it);
- ``IOptimizationProfile.set_shape(input, min, opt, max)``; ``ITimingCache.serialize()``,
  ``ITimingCache.combine(input_cache, ignore_mismatch) -> bool``;
- ``Runtime(logger).deserialize_cuda_engine(serialized_engine)``;
- ``ICudaEngine``: ``num_io_tensors``, ``get_tensor_name(index)``, ``get_tensor_mode(name)``,
  ``get_tensor_shape(name)``, ``get_tensor_dtype(name)``, ``get_tensor_profile_shape(name, profile_index)``,
  ``create_execution_context()``, ``create_engine_inspector()``;
- ``EngineInspector.get_engine_information(format) -> str``;
- ``IExecutionContext``: ``set_input_shape(name, shape) -> bool``, ``get_tensor_shape(name)``,
  ``set_tensor_address(name, memory) -> bool``, ``execute_async_v3(stream_handle) -> bool``;
- enums ``NetworkDefinitionCreationFlag``, ``BuilderFlag``, ``MemoryPoolType``, ``ProfilingVerbosity``,
  ``LayerInformationFormat``, ``TensorIOMode``, ``DataType`` (members with ``.name``; ``ILogger.Severity``).

Versions: ``make_fake_tensorrt("10.13.0.35")`` has the 10.x enums (``BuilderFlag.FP16``/``INT8`` exist,
``STRONGLY_TYPED`` = 1); ``make_fake_tensorrt("11.0.0")`` has no FP16/INT8 flags and a *different* integer for
``STRONGLY_TYPED`` (11 renumbered the enums; the fake's numbers are its own), so code that hard-codes an integer
fails one of the two.

Execution: the "plan" carries the ONNX bytes; ``execute_async_v3`` reads the input at the address given to
``set_tensor_address`` (host memory: the runner's torch device is injected as CPU), runs ONNX Runtime on CPU and
writes each output at its address — so a result read back from ``data_ptr()`` proves the binding and the dtype
mapping (``DataType.HALF`` ↔ float16). Every call is appended to ``module.calls`` as ``(name, args)``.
"""
from __future__ import annotations

import ctypes
import enum
import json
import types

import numpy as np

_MAGIC = b"FAKE-TRT-PLAN\n"
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
       "INT64": np.int64, "BOOL": np.bool_}
_FORMAT = {"FLOAT": "Row major linear FP32", "HALF": "Channel major FP16 format where channel % 8 == 0",
           "INT8": "Channel major INT8 format where channel % 32 == 0"}


def make_fake_tensorrt(version: str = "10.13.0.35", *, parse_errors=(), build_fails: bool = False,
                       execute_fails: bool = False, device_key: str = "sm90"):
    """A fresh fake ``tensorrt`` module (see the module docstring). ``device_key`` goes into timing caches:
    caches from another version or key do not combine, as in TensorRT."""
    major = int(version.split(".")[0])
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.calls = []
    mod.fail_execute = execute_fails

    def record(name, *args):
        mod.calls.append((name, args))

    # -- enums (member values are the fake's own; only names are relied upon)
    if major >= 11:
        mod.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 3})
        mod.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 0, "REFIT": 1, "DEBUG": 2})
    else:
        mod.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag",
                                                         {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        mod.BuilderFlag = enum.IntEnum("BuilderFlag", {"FP16": 0, "BF16": 1, "INT8": 2, "TF32": 5})
    mod.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    mod.ProfilingVerbosity = enum.IntEnum("ProfilingVerbosity", {"LAYER_NAMES_ONLY": 0, "NONE": 1, "DETAILED": 2})
    mod.LayerInformationFormat = enum.IntEnum("LayerInformationFormat", {"ONELINE": 0, "JSON": 1})
    mod.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    mod.DataType = enum.IntEnum("DataType", {k: i for i, k in enumerate(_NP)})

    class ILogger:
        Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})

        def __init__(self):
            pass

    mod.ILogger = ILogger

    # -- build side
    class ITensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, shape, dtype

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []
            self.onnx = None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, index):
            record("INetworkDefinition.get_input", index)
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            record("OnnxParser", network, logger)
            self.network, self.errors = network, list(parse_errors)

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

        def parse_from_file(self, model):
            record("OnnxParser.parse_from_file", model)
            if self.errors:
                return False
            import onnx

            proto = onnx.load(model)
            inits = {t.name for t in proto.graph.initializer}
            for vi in proto.graph.input:
                if vi.name in inits:
                    continue
                shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)
                self.network.inputs.append(ITensor(vi.name, shape,
                                                   mod.DataType[_ONNX_TO_TRT[vi.type.tensor_type.elem_type]]))
            self.network.onnx = proto.SerializeToString()
            return True

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, input, min, opt, max):  # noqa: A002 (the binding's argument names)
            record("IOptimizationProfile.set_shape", input, min, opt, max)
            self.shapes[input] = [tuple(min), tuple(opt), tuple(max)]

    class ITimingCache:
        def __init__(self, key, entries):
            self.key, self.entries = key, list(entries)

        def serialize(self):
            return json.dumps({"key": self.key, "entries": self.entries}).encode()

        def combine(self, input_cache, ignore_mismatch):
            record("ITimingCache.combine", input_cache, ignore_mismatch)
            if input_cache.key != self.key and not ignore_mismatch:
                return False
            self.entries += [e for e in input_cache.entries if e not in self.entries]
            return True

    class IBuilderConfig:
        def __init__(self):
            self.profiles, self.flags, self.cache = [], set(), None
            self.profiling_verbosity = mod.ProfilingVerbosity.LAYER_NAMES_ONLY

        def set_memory_pool_limit(self, pool, pool_size):
            record("IBuilderConfig.set_memory_pool_limit", pool, pool_size)

        def add_optimization_profile(self, profile):
            record("IBuilderConfig.add_optimization_profile", profile)
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def set_flag(self, flag):
            record("IBuilderConfig.set_flag", flag)
            self.flags.add(flag)

        def get_flag(self, flag):
            return flag == mod.BuilderFlag.TF32 or flag in self.flags

        def create_timing_cache(self, serialized_timing_cache):
            data = bytes(serialized_timing_cache)
            record("IBuilderConfig.create_timing_cache", len(data))
            if not data:
                return ITimingCache(f"{version}/{device_key}", [])
            try:
                d = json.loads(data)
            except ValueError:
                return None
            return ITimingCache(d["key"], d["entries"])

        def set_timing_cache(self, cache, ignore_mismatch):
            record("IBuilderConfig.set_timing_cache", cache, ignore_mismatch)
            if cache.key != f"{version}/{device_key}" and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            record("Builder", logger)
            self.logger = logger

        def create_network(self, flags=0):
            record("Builder.create_network", flags)
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            record("Builder.build_serialized_network", network, config)
            if build_fails:
                self.logger.log(ILogger.Severity.ERROR, "tactic ran out of memory")
                return None
            if config.cache is not None:
                config.cache.entries.append(f"tactic-{len(config.cache.entries)}")
            header = {"version": version, "flags": network.flags, "profiles": [p.shapes for p in config.profiles],
                      "verbosity": int(config.profiling_verbosity)}
            return _MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    mod.Builder, mod.OnnxParser = Builder, OnnxParser

    # -- run side
    class EngineInspector:
        def __init__(self, engine):
            self.engine = engine

        def get_engine_information(self, format):  # noqa: A002
            record("EngineInspector.get_engine_information", format)
            return json.dumps({"Layers": self.engine.layers(format)})

    class IExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            record("IExecutionContext.set_input_shape", name, tuple(shape))
            lo, _, hi = self.engine.profile[name]
            ok = len(shape) == len(lo) and all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if ok:
                self.shapes[name] = tuple(int(d) for d in shape)
            return ok

        def get_tensor_shape(self, name):
            record("IExecutionContext.get_tensor_shape", name)
            if name in self.engine.input_names:
                return self.shapes.get(name, self.engine.get_tensor_shape(name))
            batch = self.shapes[self.engine.input_names[0]][0]
            return tuple(batch if d < 0 else d for d in self.engine.get_tensor_shape(name))

        def set_tensor_address(self, name, memory):
            record("IExecutionContext.set_tensor_address", name, int(memory))
            if name not in self.engine.io:
                return False
            self.addresses[name] = int(memory)
            return True

        def execute_async_v3(self, stream_handle):
            record("IExecutionContext.execute_async_v3", int(stream_handle))
            if mod.fail_execute:
                self.engine.logger.log(ILogger.Severity.ERROR, "IExecutionContext::enqueueV3: illegal memory access")
                return False
            feeds = {}
            for name in self.engine.input_names:
                feeds[name] = _view(self.addresses[name], self.shapes[name], self.engine.np_dtype(name)).copy()
            outs = self.engine.session.run(self.engine.output_names, feeds)
            for name, value in zip(self.engine.output_names, outs):
                dst = _view(self.addresses[name], value.shape, self.engine.np_dtype(name))
                dst[...] = value
            return True

    class ICudaEngine:
        def __init__(self, header, onnx_bytes, logger):
            import onnx
            import onnxruntime as ort

            self.logger, self.header = logger, header
            self.proto = onnx.load_from_string(onnx_bytes)
            so = ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
            self.input_names = [i.name for i in self.session.get_inputs()]
            self.output_names = [o.name for o in self.session.get_outputs()]
            self.io = self.input_names + self.output_names
            self.profile = header["profiles"][0]
            types_ = {v.name: v.type.tensor_type for v in (*self.proto.graph.input, *self.proto.graph.output)}
            self._types = {n: mod.DataType[_ONNX_TO_TRT[types_[n].elem_type]] for n in self.io}
            self._shapes = {n: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in types_[n].shape.dim)
                            for n in self.io}

        @property
        def num_io_tensors(self):
            return len(self.io)

        def get_tensor_name(self, index):
            return self.io[index]

        def get_tensor_mode(self, name):
            return mod.TensorIOMode.INPUT if name in self.input_names else mod.TensorIOMode.OUTPUT

        def get_tensor_shape(self, name):
            return self._shapes[name]

        def get_tensor_dtype(self, name):
            return self._types[name]

        def np_dtype(self, name):
            return _NP[self._types[name].name]

        def get_tensor_profile_shape(self, name, profile_index):
            return [tuple(s) for s in self.header["profiles"][profile_index][name]]

        def create_execution_context(self):
            record("ICudaEngine.create_execution_context")
            return IExecutionContext(self)

        def create_engine_inspector(self):
            return EngineInspector(self)

        def layers(self, format):  # noqa: A002
            """One layer per compute node; a node fed by DequantizeLinear reads INT8 (TensorRT fuses DQ into it)."""
            if self.header["verbosity"] != int(mod.ProfilingVerbosity.DETAILED):
                return [n.name for n in self.proto.graph.node]
            from onnx import shape_inference

            inferred = shape_inference.infer_shapes(self.proto)
            elem = {v.name: v.type.tensor_type.elem_type
                    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
            elem.update({t.name: t.data_type for t in inferred.graph.initializer})
            made_by = {o: n.op_type for n in inferred.graph.node for o in n.output}
            out = []
            for n in inferred.graph.node:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
                    continue
                ins = ["INT8" if made_by.get(i) == "DequantizeLinear" else _ONNX_TO_TRT.get(elem.get(i), "FLOAT")
                       for i in n.input[:1] if i]
                outs = [_ONNX_TO_TRT.get(elem.get(o), "FLOAT") for o in n.output]
                out.append({"Name": n.name, "LayerType": n.op_type,
                            "Inputs": [{"Format/Datatype": _FORMAT.get(t, t)} for t in ins],
                            "Outputs": [{"Format/Datatype": _FORMAT.get(t, t)} for t in outs]})
            return out

    class Runtime:
        def __init__(self, logger):
            record("Runtime", logger)
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            record("Runtime.deserialize_cuda_engine", len(data))
            if not data.startswith(_MAGIC):
                self.logger.log(ILogger.Severity.ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            header, onnx_bytes = data[len(_MAGIC):].split(b"\n", 1)
            header = json.loads(header)
            if header["version"] != version:
                self.logger.log(ILogger.Severity.ERROR, f"plan built by TensorRT {header['version']}")
                return None
            return ICudaEngine(header, onnx_bytes, self.logger)

    mod.Runtime = Runtime
    return mod


def _view(address: int, shape, dtype) -> np.ndarray:
    """A numpy view of ``shape`` × ``dtype`` at a raw address (what TensorRT does with a device pointer)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_byte * n).from_address(address)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
