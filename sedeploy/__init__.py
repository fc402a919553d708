"""sedeploy: SE-ResNet from PyTorch to verified ONNX Runtime and TensorRT engines.

Modules follow the data flow: ``model`` → ``checkpoints`` → ``export`` → ``passes`` → ``calibration`` /
``precision`` → ``backends`` → ``bench``. Heavy libraries (torch, onnxruntime, tensorrt) are imported inside the
modules that need them, so ``import sedeploy`` stays cheap.
"""
from sedeploy.errors import SedeployError

__version__ = "0.1.0"
__all__ = ["SedeployError", "__version__"]
