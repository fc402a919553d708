"""sedeploy: SE-ResNet from PyTorch to verified ONNX Runtime, OpenVINO and TensorRT engines."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="sedeploy",
    version="0.1.0",
    description="SE-ResNet (mmcls family) or any ONNX classifier → verified ONNX → fused, FP16 and calibrated "
                "INT8 engines for ONNX Runtime, OpenVINO and TensorRT, with benchmarks and Triton serving",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["sedeploy", "sedeploy.*"]),
    include_package_data=True,
    install_requires=[
        # torch is pinned by the installer (README / .ci/run: torch==2.13.0 CPU); any torch ≥ 2.9 works.
        "torch>=2.9",
        "onnx>=1.17",
        "onnxruntime>=1.32",  # quantize_static with calibration_cache_path (sedeploy.quantize.cpu)
        "onnxscript>=0.5",
        "onnx-ir>=0.1.12",
        "onnxconverter-common>=1.14",  # the FP16 graph rewrite (sedeploy.fp16)
        "numpy>=1.24",
        "pillow>=10",
        "click>=8.1",
        "tqdm>=4.66",
    ],
    extras_require={
        # Tests: the tools, plus the CPU extras the tests exercise (OpenVINO backend and peers, Triton configs).
        "dev": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6.100", "matplotlib>=3.8", "openvino>=2025.0",
                "nncf>=2.14", "tritonclient[http,grpc]>=2.50"],
        "bench": ["matplotlib>=3.8"],
        # GPU runtimes are extras: the core runs anywhere on the CPU.
        "gpu": ["onnxruntime-gpu>=1.20"],
        # TensorRT 10.x or 11.x (12 may change the API again: not accepted untested). The `tensorrt` meta package
        # pulls tensorrt-cu12 or tensorrt-cu13 from NVIDIA's index: install the one matching the CUDA major of the
        # driver and of torch (`pip install tensorrt-cu12` / `tensorrt-cu13`). GPU buffers come from torch CUDA
        # tensors (a CUDA build of torch is needed).
        "tensorrt": ["tensorrt>=10,<12"],
        # Serving: `sedeploy package --triton` needs tritonclient (Triton's ModelConfig protobuf); `sedeploy serve`
        # needs nvidia-pytriton (bundles tritonserver; Linux, glibc >= 2.35), which pins numpy < 2.
        "serve": ["nvidia-pytriton>=0.7.0", "tritonclient[http,grpc]>=2.50"],
        # OpenVINO CPU engines (--backend openvino); NNCF is not needed to run them.
        "openvino": ["openvino>=2025.0"],
        # `sedeploy bench --peers`: OpenVINO FP32 and OpenVINO + NNCF INT8 peers measured in the same run.
        "peers": ["openvino>=2025.0", "nncf>=2.14", "matplotlib>=3.8"],
    },
    entry_points={"console_scripts": ["sedeploy=sedeploy.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
