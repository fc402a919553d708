"""sedeploy: SE-ResNet from PyTorch to verified ONNX Runtime, TensorRT and OpenVINO engines.

Modules follow the data flow, on one ONNX core (``onnxcore``: load/save/metadata/graph index/sessions):
``model`` → ``checkpoints`` → ``export`` → ``passes`` (SE fusion) → ``fp16`` / ``calibration`` / ``int8``
(portable artifacts, ``artifacts``) → ``checks`` → ``build`` (the build-engine job) → ``backends`` → ``bench``.
Heavy libraries (torch, onnxruntime, tensorrt, openvino) are imported inside the modules that need them, so
``import sedeploy`` stays cheap.
"""
from sedeploy.errors import SedeployError

__version__ = "0.1.0"
__all__ = ["SedeployError", "__version__"]
