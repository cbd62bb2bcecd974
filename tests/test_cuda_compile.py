"""Compile-only checks of the CUDA build, for machines without a GPU.

nvcc compiles each csrc/*.cu file for sm_80 and sm_90 against the installed torch's headers
(a CPU wheel is enough), and the host compiler builds csrc/bindings.cpp with WITH_CUDA defined.
Nothing here runs a kernel: the numerical checks of the CUDA kernels need a GPU.
"""
import os
import re
import shutil
import subprocess
import sysconfig
import time
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

pytestmark = pytest.mark.slow  # nvcc: ~35 s on 2 cores

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")
TIMEOUT_S = 900

# The CPU wheel lacks this header, generated when torch itself is built with CUDA.
CUDA_CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    if cuda_home:
        candidates.insert(0, str(Path(cuda_home) / "bin" / "nvcc"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _setup_std_flag(compiler):
    """The -std flag setup.py gives `compiler` ("cxx" or "nvcc"): check what the build compiles."""
    flags = re.search(rf"{compiler} = \[([^\]]*)\]", (ROOT / "setup.py").read_text())
    assert flags, f"setup.py no longer lists its {compiler} flags as `{compiler} = [...]`"
    std = re.search(r"-std=[\w+]+", flags.group(1))
    assert std, f"setup.py's {compiler} flags name no -std"
    return std.group(0)


def _common_flags(include_dir: Path):
    """Defines and include paths shared by both compilers, as torch's extension build sets them."""
    includes = [include_dir, *cpp_extension.include_paths(), sysconfig.get_paths()["include"],
                CSRC]
    return ["-DWITH_CUDA", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            *(f"-I{path}" for path in includes)]


@pytest.fixture
def stand_in_includes(tmp_path):
    header = tmp_path / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True)
    header.write_text(CUDA_CMAKE_MACROS)
    return tmp_path / "include"


def _run(cmds, what):
    """Runs the commands as parallel processes; fails on the first that fails."""
    start = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in cmds]
    try:
        outputs = [proc.communicate(timeout=TIMEOUT_S) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()  # a no-op for the finished ones
    print(f"{what}: {time.monotonic() - start:.0f} s")
    for cmd, proc, (_, stderr) in zip(cmds, procs, outputs):
        assert proc.returncode == 0, (
            f"{what} failed (exit code {proc.returncode}):\n{' '.join(map(str, cmd))}\n{stderr}")


def test_cuda_kernels_compile_for_sm80_and_sm90(tmp_path, stand_in_includes):
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA "
                    "kernels were not compile-checked")
    sources = sorted(CSRC.glob("*.cu"))
    assert len(sources) >= 2, sources  # anchored_kl_cuda.cu, sharded_losses_cuda.cu
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    objects = [tmp_path / f"{source.stem}.o" for source in sources]
    # One nvcc process per file, in parallel, each compiling both architectures in threads.
    cmds = [[nvcc, "-c", str(source), "-o", str(obj), _setup_std_flag("nvcc"), "-O3",
             "--threads", str(len(ARCHS)), "-Xcompiler", "-fPIC",
             # A device function called from host code is a bug that nvcc only warns about.
             "--Werror", "cross-execution-space-call",
             *cpp_extension.COMMON_NVCC_FLAGS, *gencode, *_common_flags(stand_in_includes)]
            for source, obj in zip(sources, objects)]
    _run(cmds, f"nvcc {' '.join(s.name for s in sources)} {' '.join(gencode)}")
    for obj in objects:
        assert obj.is_file() and obj.stat().st_size > 0, obj


def test_bindings_compile_with_cuda_declarations(tmp_path, stand_in_includes):
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler found ($CXX, c++, g++)")
    obj = tmp_path / "bindings.o"
    cmd = [cxx, "-c", str(CSRC / "bindings.cpp"), "-o", str(obj), _setup_std_flag("cxx"), "-fPIC",
           *_common_flags(stand_in_includes)]
    _run([cmd], f"{Path(cxx).name} bindings.cpp -DWITH_CUDA")
    assert obj.is_file() and obj.stat().st_size > 0

