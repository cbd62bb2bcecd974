"""Run megatron-core (0.16.x to 0.19.x) on a CPU-only PyTorch with the gloo backend.

megatron-core is written for GPUs: it allocates on ``torch.cuda.current_device()``, seeds and forks
the CUDA RNG, and its pipeline schedules create tensors on ``"cuda"`` and call
``torch.cuda.synchronize()``. On the project's CPU-only developer and CI machines each of those
raises "Torch not compiled with CUDA enabled". ``install_cpu_compat()`` removes exactly those
blockers and nothing else. It does nothing when CUDA is available, so GPU runs never depend on it.

Call it before megatron-core is imported (``nemo_anchored.parallel.distributed`` does).
"""

import contextlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def install_cpu_compat() -> bool:
    """Install the CPU shims once per process. Returns True when they are active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if _installed:
        return True
    _register_triton_free_paged_stash()
    _redirect_cuda_device_to_cpu()
    _use_cpu_rng_tracker()
    _installed = True
    return True


def _register_triton_free_paged_stash() -> None:
    # megatron-core 0.19 imports a MoE Triton kernel module from the pipeline schedules, so the
    # schedules cannot even be imported without triton (a 1 GB GPU package). The kernels only run
    # with `moe_paged_stash`, which needs a GPU anyway: a stand-in keeps the import working and
    # fails loudly if a kernel is ever called.
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if importlib.util.find_spec("triton") is not None or name in sys.modules:
        return
    megatron_spec = importlib.util.find_spec("megatron")
    if megatron_spec is None or not any(
        (Path(p) / "core/transformer/moe/ops/paged_stash.py").exists()
        for p in megatron_spec.submodule_search_locations or ()
    ):
        return

    def _needs_triton(*args, **kwargs):
        raise RuntimeError("moe_paged_stash needs triton and a GPU")

    stand_in = types.ModuleType(name, "CPU stand-in for megatron's triton paged-stash kernels")
    stand_in.GLOBAL_BLOCK_SIZE = 1024
    stand_in.paged_stash_copy_kernel = _needs_triton
    stand_in.paged_stash_pop_kernel = _needs_triton
    sys.modules[name] = stand_in


def _is_cuda_device(device) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):  # a bare int is a CUDA ordinal in torch's device arguments
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device arguments of torch functions and tensor methods to the CPU.

    Covers what a plain attribute patch cannot: ``device="cuda"`` allocations in the pipeline
    schedules and gradient clipping, ``tensor.cuda()`` when tied embeddings are synchronised
    across pipeline stages, ``tensor.to(torch.cuda.current_device())``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # The type string of a CPU tensor as its CUDA twin: megatron's gradient clipping
            # asserts `grad.type() == 'torch.cuda.FloatTensor'`.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


def _redirect_cuda_device_to_cpu() -> None:
    # Hundreds of megatron call sites pass `device=torch.cuda.current_device()`. Returning ordinal
    # 0 keeps the int type those sites expect; the mode below turns it into the CPU.
    torch.cuda.current_device = lambda: 0
    # The P2P layer synchronises the device after batched isend/irecv (a NCCL race workaround);
    # gloo's requests are complete once waited on, so there is nothing to synchronise.
    torch.cuda.synchronize = lambda device=None: None
    # megatron-core 0.19's DDP asks for the current stream before every gradient reduction (to
    # wait on CUDA-graph events, which never exist on CPU); torch's CPU stream is the no-op analog.
    torch.cuda.current_stream = torch.cpu.current_stream
    # Entered for the rest of the process: the mode stack is thread-local, and on CPU autograd
    # runs backward on the calling thread, so forward and backward both see it.
    _CudaToCpuMode().__enter__()


def _use_cpu_rng_tracker() -> None:
    # `model_parallel_cuda_manual_seed` and every dropout / weight init inside tensor-parallel
    # regions fork named CUDA RNG states (so TP ranks draw different numbers where they must).
    # This tracker keeps the same named states as CPU generator states. megatron builds its
    # tracker from the module-level class name, so replacing that name covers every way the
    # tracker gets (re)created, including `force_reset_rng`.
    from megatron.core.tensor_parallel import random as mcore_random

    class CpuRNGStatesTracker(mcore_random.CudaRNGStatesTracker):
        """megatron's named RNG states, kept as CPU generator states."""

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name=mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
