"""Builds nemo_anchored and its extension nemo_anchored._C.

The C++ CPU kernels are always built; the CUDA kernels too when the installed torch has CUDA
and nvcc is found. Installing never needs a GPU. Build without isolation so the extension
compiles against the torch already installed:  pip install --no-build-isolation -e .
"""
import os
from pathlib import Path

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = "csrc"


def extension():
    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/anchored_kl_cpu.cpp"]
    # -fno-trapping-math: no FP traps are relied on, and it lets GCC vectorize the selects.
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math"]
    with_cuda = cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None
    if os.environ.get("NEMO_ANCHORED_NO_CUDA") == "1":
        with_cuda = False
    if not with_cuda:
        return cpp_extension.CppExtension(
            "nemo_anchored._C", sources, include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx})
    nvcc = ["-O3", "-std=c++20", "-lineinfo"]
    return cpp_extension.CUDAExtension(
        "nemo_anchored._C", sources + [f"{CSRC}/anchored_kl_cuda.cu"],
        include_dirs=[str(ROOT / CSRC)], define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx + ["-DWITH_CUDA"], "nvcc": nvcc + ["-DWITH_CUDA"]})


setup(
    name="nemo-anchored",
    version="0.1.0",
    description="Anchored Learning fine-tuning on megatron-core with a fused anchored-KL operator",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nemo_anchored", "nemo_anchored.*"]),
    install_requires=["torch>=2.4", "numpy>=1.26"],
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
