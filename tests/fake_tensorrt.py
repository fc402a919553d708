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

Over the real bindings: ``make_fake_tensorrt(real=tensorrt_bindings)`` (``tests/trt_bindings.py`` imports the
real ``tensorrt_bindings`` of a 10.x or 11.x wheel over stub native libraries) keeps only what the stubs cannot
give — building, deserializing, executing — and takes *everything else from the real module*: the enums and their
values, ``Dims``, ``ILogger`` and its ``Severity``, ``DataType``, ``__version__``. Every call sedeploy makes on a
fake object is checked against the real binding's pybind11 signature (method present in this release, keyword
names, argument types: a real enum member where the binding wants one — a plain int is refused, as pybind11
refuses it; ``Dims`` or a sequence of ints; a buffer; ...), and ``Builder(logger)`` / ``Runtime(logger)`` are
first passed to the real constructors, whose argument check must accept the logger (they then fail only because
the stub library returns no builder). Shapes come back as real ``Dims``, dtypes as real ``DataType`` members.

Return codes TensorRT can give are injectable (``failures={"network", "profile", "build", "deserialize",
"context", "set_input_shape", "inspector", "execute", "set_shape"}``) so that each check in sedeploy is exercised.
The engine inspector follows TensorRT's documented behaviour: without ``execution_context`` set, shape-dependent
values are -1 and no format/type information is given; with one, each tensor carries its type in the layout of
the major version (10.x: one ``"Format/Datatype"`` text; 11.x: ``"Format"`` and ``"Datatype"``).

Execution: the "plan" carries the ONNX bytes; ``execute_async_v3`` reads the input at the address given to
``set_tensor_address`` (host memory: the runner's torch device is injected as CPU), runs ONNX Runtime on CPU and
writes each output at its address — so a result read back from ``data_ptr()`` proves the binding and the dtype
mapping (``DataType.HALF`` ↔ float16). Every call is appended to ``module.calls`` as ``(name, args)``.
"""
from __future__ import annotations

import ctypes
import enum
import functools
import json
import re
import types

import numpy as np

_MAGIC = b"FAKE-TRT-PLAN\n"
_ONNX_TO_TRT = {1: "FLOAT", 10: "HALF", 3: "INT8", 2: "UINT8", 6: "INT32", 7: "INT64", 9: "BOOL"}
_NP = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "UINT8": np.uint8, "INT32": np.int32,
       "INT64": np.int64, "BOOL": np.bool_}
_FORMAT = {"FLOAT": "Row major linear FP32", "HALF": "Channel major FP16 format where channel % 8 == 0",
           "INT8": "Channel major INT8 format where channel % 32 == 0"}


_FORMAT_11 = {"FLOAT": ("Row major linear FP32 format (kLINEAR)", "Float"),
              "HALF": ("Channel major FP16 format where channel % 8 == 0 (kHWC8)", "Half"),
              "INT8": ("Channel major INT8 format where channel % 32 == 0 (kHWC32)", "Int8")}
#: what ``sedeploy.backends.tensorrt.cuda_device`` returns on a machine with a GPU, for tests that have none
FAKE_GPU = {"gpu": "Fake GPU", "compute_capability": "9.0", "cuda_runtime": "12.8", "device_index": "0"}

FAILURES = frozenset({"network", "profile", "set_shape", "build", "deserialize", "context", "set_input_shape",
                      "inspector", "execute"})


class RealSignatures:
    """Checks a call against the real binding's pybind11 signature(s), read from the method's docstring
    (``name(self: tensorrt.tensorrt.X, arg: type = default, ...) -> ret``, one line per overload)."""

    _SIG = re.compile(r"^(?:\d+\. )?(\w+)\((.*)\) -> (.+)$")

    def __init__(self, real):
        self.real = real
        self._cache: dict[tuple[str, str], list[list[tuple[str, str, bool]]]] = {}

    def overloads(self, cls_name: str, method: str) -> list[list[tuple[str, str, bool]]]:
        key = (cls_name, method)
        if key not in self._cache:
            cls = getattr(self.real, cls_name)
            fn = cls.__dict__.get(method)
            if fn is None:
                raise AttributeError(f"tensorrt {self.real.__version__}: {cls_name} has no method {method!r}")
            sigs = []
            for line in (fn.__doc__ or "").splitlines():
                m = self._SIG.match(line.strip())
                if m and m.group(1) == method and m.group(2) != "*args, **kwargs":
                    params = [self._param(p) for p in self._split(m.group(2))]
                    sigs.append([p for p in params if p[0] != "self"])
            if not sigs:
                raise AssertionError(f"no signature found in the docstring of {cls_name}.{method}")
            self._cache[key] = sigs
        return self._cache[key]

    @staticmethod
    def _split(text: str) -> list[str]:
        out, depth, cur = [], 0, ""
        for ch in text:
            if ch in "[(<":
                depth += 1
            elif ch in "])>":
                depth -= 1
            if ch == "," and depth == 0:
                out.append(cur.strip())
                cur = ""
            else:
                cur += ch
        if cur.strip():
            out.append(cur.strip())
        return out

    @staticmethod
    def _param(text: str) -> tuple[str, str, bool]:
        name, _, rest = text.partition(":")
        annot, eq, _default = rest.partition(" = ")
        return name.strip(), annot.strip(), bool(eq)

    def _resolve(self, annot: str):
        m = re.fullmatch(r"[\w.]*?tensorrt\.((?:[A-Z]\w*)(?:\.\w+)*)", annot)
        if not m:
            return None
        obj = self.real
        for part in m.group(1).split("."):
            obj = getattr(obj, part)
        return obj

    def accepts(self, annot: str, value) -> bool:
        if annot == "str":
            return isinstance(value, str)
        if annot in ("typing.SupportsInt", "int"):
            return not isinstance(value, float) and hasattr(value, "__index__")
        if annot in ("typing.SupportsFloat", "float"):
            return isinstance(value, (int, float)) or hasattr(value, "__float__")
        if annot == "bool":
            return isinstance(value, (bool, np.bool_))
        if annot in ("tuple", "list"):
            return isinstance(value, tuple if annot == "tuple" else list)
        if annot in ("typing_extensions.Buffer", "buffer", "collections.abc.Buffer"):
            try:
                memoryview(value)
            except TypeError:
                return False
            return True
        if annot == "object":
            return True
        target = self._resolve(annot)
        if target is None:
            raise AssertionError(f"the fake cannot check the annotation {annot!r}")
        if hasattr(target, "__members__"):  # a pybind11 enum: only its own members, never a plain int
            return isinstance(value, target)
        if target.__name__.startswith("Dims"):
            if isinstance(value, self.real.Dims):
                return True
            try:
                self.real.Dims(value)
            except TypeError:
                return False
            return True
        return isinstance(value, target) or type(value).__name__ == target.__name__

    def check(self, cls_name: str, method: str, args: tuple, kwargs: dict) -> None:
        tried = []
        for params in self.overloads(cls_name, method):
            tried.append(", ".join(f"{n}: {a}" for n, a, _ in params))
            if len(args) > len(params):
                continue
            bound = dict(zip((p[0] for p in params), args))
            if any(k in bound or k not in {p[0] for p in params} for k in kwargs):
                continue
            bound.update(kwargs)
            if any(n not in bound and not has_default for n, _, has_default in params):
                continue
            if all(self.accepts(a, bound[n]) for n, a, _ in params if n in bound):
                return
        raise TypeError(f"{cls_name}.{method}(): incompatible function arguments for the real tensorrt "
                        f"{self.real.__version__} binding. Supported: " + " | ".join(f"({t})" for t in tried) +
                        f"; invoked with args={args!r}, kwargs={kwargs!r}")

    def check_property(self, cls_name: str, name: str) -> None:
        if not isinstance(getattr(self.real, cls_name).__dict__.get(name), property):
            raise AttributeError(f"tensorrt {self.real.__version__}: {cls_name} has no property {name!r}")


def make_fake_tensorrt(version: str | None = None, *, real=None, parse_errors=(), build_fails: bool = False,
                       execute_fails: bool = False, failures=(), device_key: str = "sm90"):
    """A fresh fake ``tensorrt`` module (see the module docstring). ``real``: the real ``tensorrt_bindings``
    module, whose enums, ``Dims``, ``ILogger`` and version are used and whose signatures every call is checked
    against. ``failures``: names from :data:`FAILURES` whose TensorRT call returns its failure value.
    ``device_key`` goes into timing caches: caches from another version or key do not combine, as in TensorRT."""
    failures = set(failures) | ({"build"} if build_fails else set()) | ({"execute"} if execute_fails else set())
    unknown = failures - FAILURES
    if unknown:
        raise ValueError(f"unknown failures {sorted(unknown)}; known: {sorted(FAILURES)}")
    if real is not None:
        if version not in (None, real.__version__):
            raise ValueError(f"version {version} given with the real tensorrt {real.__version__}")
        version = real.__version__
    version = version or "10.13.0.35"
    major = int(version.split(".")[0])
    mod = types.ModuleType("tensorrt")
    sigs = RealSignatures(real) if real is not None else None
    if real is not None:
        for name in dir(real):
            if not name.startswith("__"):
                setattr(mod, name, getattr(real, name))
        mod.real = real
    mod.__version__ = version
    mod.calls = []
    mod.fail_execute = "execute" in failures
    mod.failures = failures

    def record(name, *args):
        mod.calls.append((name, args))

    def checked(cls_name):
        """Check each call against the real binding's signature (over the real module), then record it."""
        def deco(fn):
            @functools.wraps(fn)
            def wrapper(self, *args, **kwargs):
                if sigs is not None:
                    sigs.check(cls_name, fn.__name__, args, kwargs)
                return fn(self, *args, **kwargs)
            return wrapper
        return deco

    def prop(cls_name, name, getter, setter=None, value_type=None):
        def get(self):
            if sigs is not None:
                sigs.check_property(cls_name, name)
            return getter(self)

        def set_(self, value):
            if sigs is not None:
                sigs.check_property(cls_name, name)
            if value_type is not None and not isinstance(value, value_type()):
                raise TypeError(f"{cls_name}.{name}: incompatible value {value!r} (expected {value_type()})")
            setter(self, value)
        return property(get, set_ if setter else None)

    if real is None:  # -- enums of the fake's own (member values are its own; only names are relied upon)
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
            Severity = enum.IntEnum("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3,
                                                 "VERBOSE": 4})

            def __init__(self):
                pass

        mod.ILogger = ILogger
        mod.Dims = tuple
    ERROR = mod.ILogger.Severity.ERROR

    def dtype(name):
        return mod.DataType.__members__[name]

    def dims(shape):
        return mod.Dims(tuple(int(d) for d in shape))

    def real_ctor_accepts(cls_name, *args):
        """The real constructor's own argument check: it must accept the arguments and fail only because the stub
        native library returns no object (pybind11: "factory function returned nullptr")."""
        if real is None:
            return
        try:
            getattr(real, cls_name)(*args)
        except TypeError as err:
            if "returned nullptr" not in str(err):
                raise
        else:
            raise AssertionError(f"real {cls_name}() succeeded: these tests expect stub native libraries")

    # -- build side
    class ITensor:
        def __init__(self, name, shape, dtype_):
            self._name, self._shape, self._dtype = name, dims(shape), dtype_

        name = prop("ITensor", "name", lambda self: self._name)
        shape = prop("ITensor", "shape", lambda self: self._shape)
        dtype = prop("ITensor", "dtype", lambda self: self._dtype)

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            self.inputs = []
            self.onnx = None

        num_inputs = prop("INetworkDefinition", "num_inputs", lambda self: len(self.inputs))

        @checked("INetworkDefinition")
        def get_input(self, index):
            record("INetworkDefinition.get_input", index)
            return self.inputs[index]

    class OnnxParser:
        def __init__(self, network, logger):
            record("OnnxParser", network, logger)
            if real is not None and not isinstance(logger, real.ILogger):
                raise TypeError(f"OnnxParser(): logger {logger!r} is not a tensorrt.ILogger")
            self.network, self.errors = network, list(parse_errors)

        num_errors = prop("OnnxParser", "num_errors", lambda self: len(self.errors))

        @checked("OnnxParser")
        def get_error(self, index):
            return self.errors[index]

        @checked("OnnxParser")
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
                self.network.inputs.append(ITensor(vi.name, shape, dtype(_ONNX_TO_TRT[vi.type.tensor_type.elem_type])))
            self.network.onnx = proto.SerializeToString()
            return True

    class IOptimizationProfile:
        def __init__(self):
            self.shapes = {}

        @checked("IOptimizationProfile")
        def set_shape(self, input, min, opt, max):  # noqa: A002 (the binding's argument names)
            record("IOptimizationProfile.set_shape", input, min, opt, max)
            lo, mid, hi = (tuple(int(d) for d in s) for s in (min, opt, max))
            if "set_shape" in failures or not (len(lo) == len(mid) == len(hi)) or \
                    not all(0 <= a <= b <= c for a, b, c in zip(lo, mid, hi)):
                raise ValueError("Inconsistent shapes: min <= opt <= max must hold")  # what the binding raises
            self.shapes[input] = [lo, mid, hi]

        def __bool__(self):
            return bool(self.shapes)

    class ITimingCache:
        def __init__(self, key, entries):
            self.key, self.entries = key, list(entries)

        @checked("ITimingCache")
        def serialize(self):
            return json.dumps({"key": self.key, "entries": self.entries}).encode()

        @checked("ITimingCache")
        def combine(self, input_cache, ignore_mismatch):
            record("ITimingCache.combine", input_cache, ignore_mismatch)
            if input_cache.key != self.key and not ignore_mismatch:
                return False
            self.entries += [e for e in input_cache.entries if e not in self.entries]
            return True

    class IBuilderConfig:
        def __init__(self):
            self.profiles, self.flags, self.cache = [], set(), None
            self._verbosity = mod.ProfilingVerbosity.LAYER_NAMES_ONLY

        profiling_verbosity = prop("IBuilderConfig", "profiling_verbosity", lambda self: self._verbosity,
                                   lambda self, v: setattr(self, "_verbosity", v), lambda: mod.ProfilingVerbosity)

        @checked("IBuilderConfig")
        def set_memory_pool_limit(self, pool, pool_size):
            record("IBuilderConfig.set_memory_pool_limit", pool, pool_size)

        @checked("IBuilderConfig")
        def add_optimization_profile(self, profile):
            record("IBuilderConfig.add_optimization_profile", profile)
            if "profile" in failures or not profile:
                return -1  # "or -1 if the input is not valid"
            self.profiles.append(profile)
            return len(self.profiles) - 1

        @checked("IBuilderConfig")
        def set_flag(self, flag):
            record("IBuilderConfig.set_flag", flag)
            self.flags.add(flag)

        @checked("IBuilderConfig")
        def get_flag(self, flag):
            return flag == mod.BuilderFlag.TF32 or flag in self.flags

        @checked("IBuilderConfig")
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

        @checked("IBuilderConfig")
        def set_timing_cache(self, cache, ignore_mismatch):
            record("IBuilderConfig.set_timing_cache", cache, ignore_mismatch)
            if cache.key != f"{version}/{device_key}" and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        @checked("IBuilderConfig")
        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            real_ctor_accepts("Builder", logger)
            record("Builder", logger)
            self.logger = logger

        @checked("Builder")
        def create_network(self, flags=0):
            record("Builder.create_network", flags)
            return None if "network" in failures else INetworkDefinition(flags)

        @checked("Builder")
        def create_builder_config(self):
            return IBuilderConfig()

        @checked("Builder")
        def create_optimization_profile(self):
            return IOptimizationProfile()

        @checked("Builder")
        def build_serialized_network(self, network, config):
            record("Builder.build_serialized_network", network, config)
            if "build" in failures:
                self.logger.log(ERROR, "tactic ran out of memory")
                return None
            if config.cache is not None:
                config.cache.entries.append(f"tactic-{len(config.cache.entries)}")
            header = {"version": version, "flags": network.flags, "profiles": [p.shapes for p in config.profiles],
                      "verbosity": config.profiling_verbosity.name}
            return _MAGIC + json.dumps(header).encode() + b"\n" + network.onnx

    mod.Builder, mod.OnnxParser = Builder, OnnxParser

    # -- run side
    class EngineInspector:
        def __init__(self, engine):
            self.engine, self._context = engine, None

        def _set_context(self, context):
            if not isinstance(context, IExecutionContext):
                raise TypeError(f"EngineInspector.execution_context: incompatible value {context!r}")
            if "inspector" not in failures:  # setExecutionContext returned false: the property stays unset
                self._context = context

        execution_context = prop("EngineInspector", "execution_context", lambda self: self._context, _set_context)

        @checked("EngineInspector")
        def get_engine_information(self, format):  # noqa: A002
            record("EngineInspector.get_engine_information", format)
            if format != mod.LayerInformationFormat.JSON:
                return "\n".join(n.name for n in self.engine.proto.graph.node)
            layers = self.engine.layers(self._context)
            io = self.engine.io
            if major >= 11:
                return json.dumps({"Layers": layers, "I/O Tensors": [{"Name": n} for n in io]})
            return json.dumps({"Layers": layers, "Bindings": io})

    class IExecutionContext:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        @checked("IExecutionContext")
        def set_input_shape(self, name, shape):
            record("IExecutionContext.set_input_shape", name, tuple(shape))
            lo, _, hi = self.engine.profile[name]
            ok = "set_input_shape" not in failures and len(shape) == len(lo) and \
                all(a <= s <= b for a, s, b in zip(lo, shape, hi))
            if ok:
                self.shapes[name] = tuple(int(d) for d in shape)
            return ok

        @checked("IExecutionContext")
        def get_tensor_shape(self, name):
            record("IExecutionContext.get_tensor_shape", name)
            if name in self.engine.input_names:
                return dims(self.shapes.get(name, self.engine._shapes[name]))
            batch = self.shapes[self.engine.input_names[0]][0]
            return dims(batch if d < 0 else d for d in self.engine._shapes[name])

        @checked("IExecutionContext")
        def set_tensor_address(self, name, memory):
            record("IExecutionContext.set_tensor_address", name, int(memory))
            if name not in self.engine.io:
                return False
            self.addresses[name] = int(memory)
            return True

        @checked("IExecutionContext")
        def execute_async_v3(self, stream_handle):
            record("IExecutionContext.execute_async_v3", int(stream_handle))
            if mod.fail_execute:
                self.engine.logger.log(ERROR, "IExecutionContext::enqueueV3: illegal memory access")
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
            self._types = {n: dtype(_ONNX_TO_TRT[types_[n].elem_type]) for n in self.io}
            self._shapes = {n: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in types_[n].shape.dim)
                            for n in self.io}

        num_io_tensors = prop("ICudaEngine", "num_io_tensors", lambda self: len(self.io))

        @checked("ICudaEngine")
        def get_tensor_name(self, index):
            return self.io[index]

        @checked("ICudaEngine")
        def get_tensor_mode(self, name):
            return mod.TensorIOMode.INPUT if name in self.input_names else mod.TensorIOMode.OUTPUT

        @checked("ICudaEngine")
        def get_tensor_shape(self, name):
            return dims(self._shapes[name])

        @checked("ICudaEngine")
        def get_tensor_dtype(self, name):
            return self._types[name]

        def np_dtype(self, name):
            return _NP[self._types[name].name]

        @checked("ICudaEngine")
        def get_tensor_profile_shape(self, name, profile_index):
            return [dims(s) for s in self.header["profiles"][profile_index][name]]

        @checked("ICudaEngine")
        def create_execution_context(self):
            record("ICudaEngine.create_execution_context")
            return None if "context" in failures else IExecutionContext(self)

        @checked("ICudaEngine")
        def create_engine_inspector(self):
            return EngineInspector(self)

        def layers(self, context):
            """One layer per compute node; a node fed by DequantizeLinear reads INT8 (TensorRT fuses DQ into it).
            Without an execution context whose input shape is set, shapes that depend on it are -1 and no
            format/type information is given (NvInferRuntime.h, IEngineInspector)."""
            if self.header["verbosity"] != "DETAILED":
                return [n.name for n in self.proto.graph.node]
            from onnx import shape_inference

            batch = context.shapes.get(self.input_names[0], (None,))[0] if context is not None else None
            inferred = shape_inference.infer_shapes(self.proto)
            elem = {v.name: v.type.tensor_type.elem_type
                    for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
            elem.update({t.name: t.data_type for t in inferred.graph.initializer})
            shape = {v.name: [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]
                     for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
            made_by = {o: n.op_type for n in inferred.graph.node for o in n.output}

            def tensor(name, kind):
                dims_ = [batch if d < 0 and batch is not None else d for d in shape.get(name, [])]
                entry = {"Name": name, "Location": "Device", "Dimensions": dims_}
                if batch is None:  # no execution context: "format information will not be shown"
                    return entry
                if major >= 11:
                    fmt, dt = _FORMAT_11.get(kind, (kind, kind.title()))
                    entry.update({"Format": fmt, "Datatype": dt})
                else:
                    entry["Format/Datatype"] = _FORMAT.get(kind, kind)
                return entry

            out = []
            for n in inferred.graph.node:
                if n.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant"):
                    continue
                ins = [(i, "INT8" if made_by.get(i) == "DequantizeLinear" else _ONNX_TO_TRT.get(elem.get(i), "FLOAT"))
                       for i in n.input[:1] if i]
                outs = [(o, _ONNX_TO_TRT.get(elem.get(o), "FLOAT")) for o in n.output]
                out.append({"Name": n.name, "LayerType": n.op_type,
                            "Inputs": [tensor(i, k) for i, k in ins], "Outputs": [tensor(o, k) for o, k in outs]})
            return out

    class Runtime:
        def __init__(self, logger):
            real_ctor_accepts("Runtime", logger)
            record("Runtime", logger)
            self.logger = logger

        @checked("Runtime")
        def deserialize_cuda_engine(self, serialized_engine):
            data = bytes(serialized_engine)
            record("Runtime.deserialize_cuda_engine", len(data))
            if "deserialize" in failures:
                self.logger.log(ERROR, "Serialization failed: out of device memory")
                return None
            if not data.startswith(_MAGIC):
                self.logger.log(ERROR, "Serialization assertion failed: magic tag mismatch")
                return None
            header, onnx_bytes = data[len(_MAGIC):].split(b"\n", 1)
            header = json.loads(header)
            if header["version"] != version:
                self.logger.log(ERROR, f"plan built by TensorRT {header['version']}")
                return None
            return ICudaEngine(header, onnx_bytes, self.logger)

    mod.Runtime = Runtime
    return mod


def _view(address: int, shape, dtype) -> np.ndarray:
    """A numpy view of ``shape`` × ``dtype`` at a raw address (what TensorRT does with a device pointer)."""
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = (ctypes.c_byte * n).from_address(address)
    return np.frombuffer(buf, dtype=dtype).reshape(shape)
