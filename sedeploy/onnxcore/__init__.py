"""The ONNX core every other module builds on: one place for each basic ONNX concept.

- :mod:`~sedeploy.onnxcore.io` — load (with clear errors), save (atomic, checked), metadata, file hashes, the
  image input of a classifier, node naming;
- :mod:`~sedeploy.onnxcore.graph` — a read-only index over a graph (producers, consumers, constants, element
  types), "is this model quantized?" and "what precision does this graph compute in?";
- :mod:`~sedeploy.onnxcore.session` — ONNX Runtime sessions with explicit providers and threads.

Nothing heavy is imported here: ``onnx`` and ``onnxruntime`` load inside the functions that use them.
"""
from sedeploy.onnxcore.graph import (QOPERATOR_OPS, QDQ_OPS, Graph, attr, compute_depths, default_opset,
                                     graph_precision, holds_fp16_tensors, is_quantized, output_kind)
from sedeploy.onnxcore.inputs import nchw_input, parse_input_shape, pin_image_size
from sedeploy.onnxcore.io import (META, ImageInput, as_model, available_memory, check_input_memory,
                                  classifier_output, complete_onnx, copy_model, get_metadata, image_input,
                                  input_layout, load_onnx, name_nodes, save_onnx, set_metadata, sha256_file)
from sedeploy.onnxcore.session import (CPU, available_providers, check_threads, cpu_session, default_threads,
                                       make_session, pad_to_batch, resolve_providers, run_model)

__all__ = ["QOPERATOR_OPS", "QDQ_OPS", "Graph", "attr", "compute_depths", "default_opset", "graph_precision", "holds_fp16_tensors",
           "is_quantized", "output_kind", "META", "ImageInput", "as_model", "classifier_output", "copy_model",
           "get_metadata", "image_input", "available_memory", "check_input_memory", "input_layout", "nchw_input",
           "parse_input_shape", "pin_image_size", "complete_onnx",
           "load_onnx", "name_nodes", "save_onnx", "set_metadata", "sha256_file", "CPU", "available_providers",
           "check_threads", "cpu_session", "default_threads", "make_session", "pad_to_batch", "resolve_providers",
           "run_model"]
