"""Every global patch this project makes to megatron-core (0.16.x to 0.19.x), in one place.

Three entry points, each called from exactly one place:

- ``register_import_stand_ins()``, from ``nemo_anchored/__init__.py``: the one patch that must
  precede ``import megatron``. megatron-core 0.19 imports a Triton kernel module while importing
  itself; without Triton (a 1 GB GPU package, absent on CPU machines) nothing of megatron can
  be imported. A stand-in module takes its place. Cheap (no torch, no megatron import), so the
  package root can afford it; importing megatron before any ``nemo_anchored`` module on such a
  machine fails at once with ``ModuleNotFoundError: triton``, never silently.
- ``install()``, from ``nemo_anchored.parallel.distributed.init_process_group``, which every
  entry point (the trainer, the converter's shard processes, evaluation, the lab, the tests)
  runs before it builds anything with megatron. These patches replace functions and classes
  that megatron looks up when it uses them, so megatron may well be imported before; a tracker
  megatron created too early is rebuilt (on a CPU machine it holds no state: seeding it would
  have failed). Each patch, and when it applies:

  * **CPU-only torch** (the developer and CI machines). megatron-core is written for GPUs: it
    allocates on ``torch.cuda.current_device()``, seeds and forks the CUDA RNG (and saves and
    restores it around activation recomputation), and its pipeline schedules create tensors on
    ``"cuda"`` and call ``torch.cuda.synchronize()``; each raises "Torch not compiled with CUDA
    enabled". CUDA devices mapped to the CPU and a CPU RNG tracker remove exactly those
    blockers; GPU runs never get them.
  * **torch's Adam under megatron's distributed optimizer** (neither Apex nor Transformer Engine
    installed, CPU or GPU): loading its state fails as shipped; see
    ``_keep_a_step_per_parameter`` and ``prepare_optimizer_for_load``.

- ``filter_irrelevant_warnings()``, from the command line's ``main``: hides the warnings
  megatron-core prints on every run that say nothing about this project's runs (see there).
  Only for the command line: a library does not change its importer's warning filters.

Not global: ``prepare_optimizer_for_load``, which ``nemo_anchored.checkpoint.sharded`` applies to
each optimizer a checkpoint is loaded into (SGD; torch Adam under the distributed optimizer).
"""

import contextlib
import importlib.util
import sys
import types
from pathlib import Path
from typing import List, Optional

# torch is imported inside the functions: the package root imports this module for
# register_import_stand_ins, and `nemo-anchored --help` should not pay for torch.
_installed: Optional[List[str]] = None


def install() -> List[str]:
    """Apply the patches that fit this process, once. Returns the names of those applied."""
    import torch

    global _installed
    if _installed is None:
        _installed = []
        if not torch.cuda.is_available():
            _redirect_cuda_device_to_cpu()
            _use_cpu_rng_tracker()
            _installed.append("cpu")
        if _torch_adam_distributed_optimizer():
            _keep_a_step_per_parameter()
            _installed.append("distributed_optimizer_step")
    return list(_installed)


# (category, message regex) of warnings raised from megatron.core, or from torch functions
# megatron calls through this module's CUDA-to-CPU mode (which then shows as their caller);
# each matched by message and module, so every other warning, of megatron's or anyone's, shows.
_IRRELEVANT_WARNINGS = (
    # On importing megatron.core.optimizer and the FSDP mixed-precision helpers, and building
    # a layer spec. This project uses megatron's local layers and torch's optimizers by design
    # (Transformer Engine and Apex are optional: README), so the fallback is the intended path.
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to "),
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    # TransformerConfig's own default (cuda_graph_scope="full") trips its own deprecation
    # warning for every model built; this project uses no CUDA graphs.
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),
    # On every checkpoint load: torch deprecations of the APIs megatron's distributed
    # checkpointing uses; megatron's to migrate, nothing a user can act on.
    (FutureWarning, r"`load_state_dict` is deprecated and will be removed"),
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
)


def filter_irrelevant_warnings() -> None:
    """Ignore the warnings in ``_IRRELEVANT_WARNINGS``."""
    import warnings

    for category, message in _IRRELEVANT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category,
                                module=rf"megatron\.core(\.|$)|{__name__}$")


def register_import_stand_ins() -> None:
    """Register the stand-in for megatron 0.19's Triton paged-stash kernels where Triton is
    missing. The kernels only run with ``moe_paged_stash``, which needs a GPU and Triton anyway:
    the stand-in keeps the import working and fails loudly if a kernel is ever called."""
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


def _redirect_cuda_device_to_cpu() -> None:
    import torch
    from torch.overrides import TorchFunctionMode

    def is_cuda_device(device) -> bool:
        if isinstance(device, bool):
            return False
        if isinstance(device, int):  # a bare int is a CUDA ordinal in torch's device arguments
            return True
        if isinstance(device, str):
            return device.startswith("cuda")
        return isinstance(device, torch.device) and device.type == "cuda"

    class CudaToCpuMode(TorchFunctionMode):
        """Maps CUDA device arguments of torch functions and tensor methods to the CPU.

        Covers what a plain attribute patch cannot: ``device="cuda"`` allocations in the
        pipeline schedules and gradient clipping, ``tensor.cuda()`` when tied embeddings are
        synchronised across pipeline stages, ``tensor.to(torch.cuda.current_device())``.
        """

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.Tensor.cuda:
                return args[0]
            if func is torch.Tensor.type and len(args) == 1 and not kwargs:
                # The type string of a CPU tensor as its CUDA twin: megatron's gradient
                # clipping asserts `grad.type() == 'torch.cuda.FloatTensor'`.
                return func(*args).replace("torch.", "torch.cuda.", 1)
            if is_cuda_device(kwargs.get("device")):
                kwargs = {**kwargs, "device": "cpu"}
            if func is torch.Tensor.to and len(args) > 1 and is_cuda_device(args[1]):
                args = (args[0], "cpu", *args[2:])
            return func(*args, **kwargs)

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
    # runs backward on the calling thread, so forward and backward both see it; except a
    # backward pass started by `tensor.backward()` or `torch.autograd.backward`, which runs
    # inside the mode's own handler, where the mode is off (megatron's schedules call the
    # autograd engine directly). The one CUDA allocation such a backward pass can meet is
    # activation recomputation rebuilding megatron's causal mask (local attention): built on
    # the CPU from the start instead.
    CudaToCpuMode().__enter__()
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    def default_causal_mask(sq: int) -> torch.Tensor:
        return torch.ones(sq, sq, dtype=torch.bool).triu(diagonal=1)

    utils.get_default_causal_mask = fused_softmax.get_default_causal_mask = default_causal_mask


def _use_cpu_rng_tracker() -> None:
    # `model_parallel_cuda_manual_seed` and every dropout / weight init inside tensor-parallel
    # regions fork named CUDA RNG states (so TP ranks draw different numbers where they must).
    # This tracker keeps the same named states as CPU generator states. megatron builds its
    # tracker from the module-level class name, so replacing that name covers every way the
    # tracker gets (re)created, including `force_reset_rng`.
    import torch
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
    if mcore_random._CUDA_RNG_STATE_TRACKER is not None and not isinstance(
            mcore_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mcore_random.initialize_rng_tracker(force_reset=True)

    # Activation recomputation (megatron's CheckpointFunction) saves the CPU state, the CUDA
    # state and the tracker's states before a forward and restores them to redraw the same
    # dropout masks when it recomputes. There is no CUDA generator here: the default stream
    # and the tracker's streams are all CPU states, which the other two already cover. The
    # CUDA state becomes an empty stand-in: reading the real one raises, and setting it would
    # queue a callback that never runs (torch's lazy CUDA initialisation), one per recomputed
    # layer, for the life of the process.
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *args, **kwargs: None


# ------------------------------------------------------- torch's Adam in the distributed optimizer


def _torch_adam_distributed_optimizer() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def _keep_a_step_per_parameter() -> None:
    """``DistributedOptimizer.load_state_dict`` puts ONE ``step`` tensor into every parameter's
    torch-Adam state (from the param groups), then copies each parameter's state from the
    checkpoint, whose per-parameter states have no ``step``: a KeyError. Were it to get past
    that, Adam would increment the shared tensor once per parameter at each step. Each
    parameter gets its own copy of the step instead, kept as loaded."""
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    set_states = cls._set_main_param_and_optimizer_states

    def set_states_keeping_step(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state[main_param]
        if "step" in state and "step" not in tensors:
            state["step"] = state["step"].clone()
            tensors = {**tensors, "step": state["step"]}
        set_states(self, model_param, tensors)

    cls._set_main_param_and_optimizer_states = set_states_keeping_step


def prepare_optimizer_for_load(optimizer) -> None:
    """Give a megatron optimizer the state its checkpoint is loaded into, before its state dict
    is described for loading (``sharded_state_dict(is_loading=True)``). The load overwrites the
    values created here; an optimizer that has stepped keeps what it has.

    * **SGD**: megatron builds it with ``init_state_fn=None`` and then calls that function when
      describing the state for loading: ``TypeError: 'NoneType' object is not callable``. SGD
      gets one that creates the momentum buffers (none without momentum), so the checkpoint's
      buffers have somewhere to go.
    * **torch Adam under the distributed optimizer** (neither Apex nor Transformer Engine):
      ``DistributedOptimizer.state_dict`` reads every parameter's ``step``, which torch creates
      at the first step, so a fresh optimizer cannot describe its state: it gets zero state.
    """
    import torch
    from megatron.core import optimizer as mcore_optimizer
    from megatron.core.optimizer import distrib_optimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if opt.init_state_fn is None and isinstance(opt.optimizer, mcore_optimizer.SGD):
            opt.init_state_fn = _init_sgd_state
        if (_torch_adam_distributed_optimizer() and opt.init_state_fn is not None
                and isinstance(opt, distrib_optimizer.DistributedOptimizer)):
            opt.init_state_fn(opt.optimizer, opt.config)
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    opt.optimizer.state[param].setdefault("step", torch.tensor(0.0))


def _init_sgd_state(opt, config=None) -> None:
    """megatron's ``init_state_fn`` contract for SGD (torch's, Apex's or Transformer Engine's,
    which all keep ``momentum_buffer``). A zero buffer steps exactly like none (dampening 0:
    0 * momentum + grad == grad)."""
    import torch

    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue  # SGD keeps no state without momentum
        for param in group["params"]:
            opt.state[param].setdefault("momentum_buffer", torch.zeros_like(param.data))
