"""sedeploy: SE-ResNet from PyTorch to verified ONNX Runtime and TensorRT engines."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="sedeploy",
    version="0.1.0",
    description="SE-ResNet (mmcls family) → verified ONNX → fused, FP16 and calibrated INT8 engines for "
                "ONNX Runtime and TensorRT, with benchmarks",
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
        "onnxruntime>=1.20",
        "onnxscript>=0.5",
        "onnx-ir>=0.1.12",
        "onnxconverter-common>=1.14",  # the FP16 graph rewrite (sedeploy.precision)
        "numpy>=1.24",
        "pillow>=10",
        "click>=8.1",
        "tqdm>=4.66",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "matplotlib>=3.8"],
        "bench": ["matplotlib>=3.8"],
        # GPU runtimes are extras: the core runs anywhere on the CPU.
        "gpu": ["onnxruntime-gpu>=1.20"],
        # TensorRT 10.x or 11.x; GPU buffers come from torch CUDA tensors (a CUDA build of torch is needed).
        "tensorrt": ["tensorrt>=10.0"],
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
