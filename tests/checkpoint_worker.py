"""Worker for tests/test_checkpoint.py; every comparison becomes a named check in JSON.

Under torchrun with 2 processes, one process pair runs every layout in turn, re-initialising
megatron's groups in between:
  A. TP=2: 2 steps, save (policy, snapshot, adam, lr scheduler, per-rank trainer state), 2 more
     steps. Rebuilt from another seed and loaded, the same 2 steps give bitwise the same losses
     and weights (dropout on: the RNG restore is what makes them equal). Then crash leftovers,
     errors, and re-saving over an existing checkpoint.
  B. TP=1 (DP=2): the TP=2 checkpoint's weights (and optimizer state) resharded, logits against
     the TP=2 model; a resume round trip with megatron's distributed optimizer across the two
     data-parallel ranks; architecture mismatches; a TP=1 weights-only checkpoint.
  C. TP=2 again: that TP=1 checkpoint's weights, logits against the TP=1 model; the
     distributed optimizer's checkpoint resharded.
  D. PP=2: each stage loads its layers of the TP=1 checkpoint and saves them; back at TP=1
     the weights load unchanged.
Without torchrun, a world of one process runs the resume round trip, the same with SGD, the
file checksums, and the error messages of damaged, foreign and incomplete checkpoints and of a
full disk.
Models are fp32 on CPU; "bitwise" checks use torch.equal.

Each check has a topic (the pytest test that asserts it), a name and, for numeric checks, a
value that must not exceed its limit. Rank 0 writes all ranks' checks to --out.
"""

import argparse
import errno
import json
import os
import random
import shutil
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from tests.launch import CheckLog
from nemo_anchored.checkpoint.format import MARKER, CheckpointError, latest_checkpoint
from nemo_anchored.checkpoint.sharded import load_checkpoint, load_model_weights, save_checkpoint
from nemo_anchored.config import GPTConfig
from nemo_anchored.models.gpt import build_gpt_model, full_state_dict_key
from nemo_anchored.parallel.distributed import (
    init_process_group,
    model_parallel,
    set_seed,
    shutdown,
)

import megatron.core
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

CFG = GPTConfig(
    num_layers=2,
    hidden_size=32,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=64,
    vocab_size=1100,  # padded to 1152 in every layout (576 columns per rank at TP=2)
    max_seq_len=16,
    add_qkv_bias=True,
    hidden_dropout=0.1,  # dropout draws from the default torch stream...
    attention_dropout=0.1,  # ...and from megatron's tensor-parallel tracker stream
)
RANK = int(os.environ.get("RANK", "0"))
SEED = 1234
MICRO_BATCHES = 2
MICRO_BATCH_SIZE = 2
SEQ = 16

LOG = CheckLog(RANK)
check, expect, checks = LOG.check, LOG.expect, LOG.items


def raises(topic, name, fn, *needles):
    """``fn`` raises CheckpointError whose message contains every needle."""
    try:
        fn()
    except CheckpointError as err:
        missing = [n for n in needles if n not in str(err)]
        expect(topic, f"{name} (message names {needles})", not missing)
        return
    except Exception as err:  # the wrong error type is a failed check, not a crash
        expect(topic, f"{name}: raised {type(err).__name__} instead: {err}", False)
        return
    expect(topic, f"{name}: nothing raised", False)


def guarded(topic, fn, *args):
    """``fn(*args)``; an exception is a failed check of ``topic``, and the other topics run."""
    try:
        fn(*args)
    except Exception as err:  # a failed check, not a crash of the whole worker
        expect(topic, f"{fn.__name__} raised {type(err).__name__}: {err}", False)


# ------------------------------------------------------------------------------ training


class Run:
    """A policy in megatron DDP with adam (or SGD with momentum) and a cosine lr schedule, plus
    a frozen snapshot."""

    def __init__(self, cfg=CFG, distributed_optimizer=False, optimizer="adam"):
        self.policy = build_gpt_model(cfg, use_transformer_engine=False)
        self.snapshot = build_gpt_model(cfg, use_transformer_engine=False)
        self.snapshot.requires_grad_(False)
        self.snapshot.eval()
        self.ddp = DistributedDataParallel(
            config=self.policy.config,
            ddp_config=DistributedDataParallelConfig(
                grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer),
            module=self.policy,
        )
        self.policy.config.no_sync_func = self.ddp.no_sync
        self.policy.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer=optimizer, lr=1e-3, min_lr=1e-4, clip_grad=1.0,
                            weight_decay=0.01, sgd_momentum=0.9,
                            use_distributed_optimizer=distributed_optimizer),
            [self.ddp])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=1e-4, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=2,
            lr_decay_steps=10, lr_decay_style="cosine", start_wd=0.01, end_wd=0.01,
            wd_incr_steps=10, wd_incr_style="constant")

    def step(self, global_step):
        """One optimizer step on this data-parallel rank's batches for ``global_step``."""
        batches = micro_batches(global_step)
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        logged = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=self.ddp,
            num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE)
        updated, _, _ = self.optimizer.step()
        assert updated
        self.scheduler.step(increment=1)
        return torch.stack([d["loss"] for d in logged])

    def steps(self, first, count):
        return torch.stack([self.step(s) for s in range(first, first + count)])

    def weights(self):
        return tensors(self.policy)

    def state(self, step):
        """What a trainer would save: shared position, plus a rank-specific value."""
        return {"position": {"global_step": step, "outer": 0, "inner_step": step},
                "metrics": {"tokens_seen": step * 64, "rank_local": RANK * 10 + step}}


def tensors(model):
    """A copy of this rank's state dict (its tensors; megatron adds None extra states)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)}


def micro_batches(global_step, shard=None):
    """Deterministic in (global step, data shard), by default this data-parallel rank's shard:
    the data order is not RNG state."""
    if shard is None:
        shard = parallel_state.get_data_parallel_rank()
    g = torch.Generator().manual_seed(1000 * global_step + shard)
    return [{"tokens": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g),
             "position_ids": torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ),
             "labels": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g)}
            for _ in range(MICRO_BATCHES)]


def forward_step(data_iterator, model):
    batch = next(data_iterator)
    logits = model(batch["tokens"], batch["position_ids"], None)

    def loss_func(logits):
        # vocab_parallel_cross_entropy works in place on fp32 logits: give it a copy.
        loss_sum = tensor_parallel.vocab_parallel_cross_entropy(
            logits.clone(), batch["labels"]).sum()
        num_tokens = torch.tensor(batch["labels"].numel(), dtype=torch.int)
        return loss_sum, num_tokens, {"loss": loss_sum.detach()}

    return logits, loss_func


def eval_logits(model):
    """Full-vocabulary logits (real columns) of a fixed batch, without dropout."""
    batch = micro_batches(99, shard=0)[0]
    model.eval()
    with torch.no_grad():
        logits = model(batch["tokens"], batch["position_ids"], None)
    model.train()
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., : CFG.vocab_size]


def unshard(local, param):
    """The TP=1 tensor of a TP-sharded parameter."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = [torch.chunk(part, stride, dim=dim) for part in parts]
    return torch.cat([blocks[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def full_tensors(model, per_param):
    """{unsharded name: unsharded per_param(param)}, vocabulary rows cut to the real ones."""
    out = {}
    for name, param in model.named_parameters():
        full = unshard(per_param(param), param)
        if getattr(param, "is_embedding_or_output_parameter", False):
            full = full[: CFG.vocab_size]
        out[full_state_dict_key(model, name)] = full
    return out


def full_weights(model):
    return full_tensors(model, lambda p: p.detach())


def momentum_buffers(run):
    """SGD's momentum buffers by parameter name (fp32 params: state keyed by param)."""
    state = run.optimizer.chained_optimizers[0].optimizer.state
    return {name: state[p]["momentum_buffer"].clone() for name, p in run.policy.named_parameters()
            if "momentum_buffer" in state[p]}


def full_exp_avg(run):
    """adam's first moments by unsharded parameter name (fp32 params: state keyed by param)."""
    state = run.optimizer.chained_optimizers[0].optimizer.state
    return full_tensors(run.policy, lambda p: state[p]["exp_avg"])


def rng_fingerprint():
    """Every stream a resume must continue: python, numpy, torch, megatron's tracker."""
    return {"python": random.getstate(), "numpy": np.random.get_state()[1].copy(),
            "torch": torch.get_rng_state(),
            "tracker": {k: v.clone() for k, v in
                        tensor_parallel.get_cuda_rng_tracker().get_states().items()}}


def same_rng(a, b):
    return (a["python"] == b["python"] and np.array_equal(a["numpy"], b["numpy"])
            and torch.equal(a["torch"], b["torch"]) and a["tracker"].keys() == b["tracker"].keys()
            and all(torch.equal(a["tracker"][k], b["tracker"][k]) for k in a["tracker"]))


def recomputed_records(ckpt):
    """Every file of ``ckpt`` but the marker, with its size and CRC-32 recomputed here."""
    return {p.name: {"bytes": p.stat().st_size, "crc32": f"{zlib.crc32(p.read_bytes()):08x}"}
            for p in ckpt.iterdir() if p.name != MARKER}


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def edit_marker(ckpt, edit):
    marker = json.loads((ckpt / MARKER).read_text())
    edit(marker)
    (ckpt / MARKER).write_text(json.dumps(marker))


def bitwise(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def on_rank0(fn):
    """Rank 0 changes files once every rank is done with them; the others see the change."""
    dist.barrier()
    if dist.get_rank() == 0:
        fn()
    dist.barrier()


# -------------------------------------------------------------------------------- phases


def phase_a_resume_tp2(root):
    """Same-layout resume at TP=2, crash leftovers, errors. Returns what phase B compares."""
    topic = "resume"
    with model_parallel(2, 1, seed=SEED):
        run = Run()
        run.steps(0, 1)
        run.snapshot.load_state_dict(run.policy.state_dict())  # a snapshot from step 1
        run.steps(1, 1)
        logits = eval_logits(run.policy)  # before saving: eval consumes no random numbers
        reference = {"weights": full_weights(run.policy), "exp_avg": full_exp_avg(run),
                     "logits": logits, "num_steps": run.scheduler.num_steps}
        snapshot_weights = tensors(run.snapshot)
        saved_weights, saved_exp_avg = run.weights(), full_exp_avg(run)
        rng_at_save = rng_fingerprint()
        ckpt = root / "step_0000002"
        save_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                        scheduler=run.scheduler, snapshot=run.snapshot, state=run.state(2))
        expect(topic, "saving consumed no random numbers", same_rng(rng_at_save, rng_fingerprint()))
        losses = run.steps(2, 2)
        final = run.weights()

        # Rebuilt from another seed, with other python/numpy streams.
        set_seed(SEED + 1)
        run = Run()
        expect(topic, "the rebuilt model starts from other weights",
               not bitwise(run.weights(), saved_weights))
        expect(topic, "before loading, the RNG streams differ from those at save",
               not same_rng(rng_at_save, rng_fingerprint()))
        state = load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                                scheduler=run.scheduler, snapshot=run.snapshot)
        expect(topic, "load returns this rank's own trainer state", state == run.state(2))
        expect(topic, "RNG states (python, numpy, torch, TP tracker) after load == at save",
               same_rng(rng_at_save, rng_fingerprint()))
        expect(topic, "policy weights bitwise restored", bitwise(run.weights(), saved_weights))
        expect(topic, "snapshot weights bitwise restored",
               bitwise(tensors(run.snapshot), snapshot_weights))
        expect(topic, "adam moments bitwise restored", bitwise(full_exp_avg(run), saved_exp_avg))
        expect(topic, "lr scheduler restored",
               run.scheduler.num_steps == reference["num_steps"] == 2)
        resumed = run.steps(2, 2)
        check(topic, "losses of steps 3-4 after resume: max |diff| (bitwise)",
              (resumed - losses).abs().max(), 0.0)
        expect(topic, "losses of steps 3-4 bitwise equal", torch.equal(resumed, losses))
        expect(topic, "weights after step 4 bitwise equal", bitwise(run.weights(), final))

        # Without the RNG restore, the same weights and data give other dropout masks.
        load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                        scheduler=run.scheduler, snapshot=run.snapshot)
        set_seed(SEED + 7)
        other = run.steps(2, 2)
        expect(topic, "without the RNG restore the losses of steps 3-4 differ",
               not torch.equal(other, losses))

        crash_and_errors(root, ckpt, run)
        checksums_of_two_ranks(root, ckpt, run)
    return reference


def crash_and_errors(root, ckpt, run):
    topic = "atomic"

    def leftovers():
        # A save that crashed before the marker, one that crashed between marker and rename,
        # a renamed directory whose marker is gone, and one of another format version.
        for name in ("step_0000009.tmp", "step_0000008.tmp", "step_0000007", "step_0000006"):
            shutil.copytree(ckpt, root / name)
        (root / "step_0000009.tmp" / MARKER).unlink()
        (root / "step_0000007" / MARKER).unlink()
        marker = json.loads((ckpt / MARKER).read_text())
        marker["format_version"] = 99
        (root / "step_0000006" / MARKER).write_text(json.dumps(marker))

    on_rank0(leftovers)
    expect(topic, "latest_checkpoint skips .tmp, unmarked and foreign-format directories",
           latest_checkpoint(root) == ckpt)
    expect(topic, "latest_checkpoint of an empty or missing root is None",
           latest_checkpoint(root / "nothing") is None)
    expect(topic, "the marker holds the trainer state and global step",
           json.loads((ckpt / MARKER).read_text())["state"]["position"]["global_step"] == 2
           and json.loads((ckpt / MARKER).read_text())["global_step"] == 2)
    for name in ("step_0000007", "step_0000009.tmp"):
        raises(topic, f"load_checkpoint of {name} (no marker) raises",
               lambda: load_checkpoint(root / name, model=run.policy), str(root / name),
               "incomplete")
        raises(topic, f"load_model_weights of {name} (no marker) raises",
               lambda: load_model_weights(root / name, run.policy), str(root / name))
    raises(topic, "another format version raises",
           lambda: load_model_weights(root / "step_0000006", run.policy), "format version")
    raises(topic, "a missing directory raises",
           lambda: load_checkpoint(root / "nope", model=run.policy), str(root / "nope"),
           "does not exist")

    # Re-saving over a complete checkpoint (weights only now) swaps it in whole.
    weights_only = root / "step_0000005"
    save_checkpoint(weights_only, model=run.policy, state=run.state(5))
    save_checkpoint(weights_only, model=run.policy, state=run.state(5))
    expect(topic, "re-saving leaves one complete directory, no .tmp / .old siblings",
           (weights_only / MARKER).is_file()
           and not weights_only.with_name(weights_only.name + ".tmp").exists()
           and not weights_only.with_name(weights_only.name + ".old").exists())
    expect(topic, "latest_checkpoint picks the highest global step",
           latest_checkpoint(root) == weights_only)
    raises(topic, "loading an optimizer from a weights-only checkpoint raises",
           lambda: load_checkpoint(weights_only, model=run.policy, optimizer=run.optimizer),
           str(weights_only), "optimizer")
    on_rank0(lambda: shutil.rmtree(weights_only))


def checksums_of_two_ranks(root, ckpt, run):
    """Each rank records the files it wrote; a damaged file found by one rank stops both."""
    topic = "checksums"
    records = json.loads((ckpt / MARKER).read_text()).get("files")
    expect(topic, "the marker records every file, both ranks' data files among them, with the "
           "sizes and CRC-32s recomputed here",
           records == recomputed_records(ckpt)
           and {name[:4] for name in records if name.endswith(".distcp")} == {"__0_", "__1_"})
    damaged, name = root / "damaged_by_rank1", sorted(p.name for p in ckpt.glob("__1_*.distcp"))[0]

    def damage():
        shutil.copytree(ckpt, damaged)
        flip_byte(damaged / name)

    on_rank0(damage)
    raises(topic, f"a flipped byte in {name} (rank 1 wrote it) raises on every rank",
           lambda: load_checkpoint(damaged, model=run.policy, optimizer=run.optimizer,
                                   scheduler=run.scheduler, snapshot=run.snapshot),
           str(damaged), f"file {name} is corrupt: checksum mismatch")
    on_rank0(lambda: shutil.rmtree(damaged))


def phase_b_tp1(root, tp2):
    topic = "reshard"
    with model_parallel(1, 1, seed=SEED + 2):
        ckpt = root / "step_0000002"
        run = Run()
        load_model_weights(ckpt, run.policy)
        weights = full_weights(run.policy)
        check(topic, "TP2 -> TP1 load_model_weights: unsharded weights max |diff|",
              max_diff(weights, tp2["weights"]), 0.0)
        check(topic, "TP2 -> TP1 load_model_weights: logits max |diff| vs the TP2 model",
              (eval_logits(run.policy) - tp2["logits"]).abs().max(), 1e-5)

        run = Run()
        state = load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                                scheduler=run.scheduler, snapshot=run.snapshot)
        expect(topic, "TP2 -> TP1 load_checkpoint: rank 0's trainer state on every rank",
               state["metrics"]["rank_local"] == 2 and state["position"]["global_step"] == 2)
        check(topic, "TP2 -> TP1 load_checkpoint: weights max |diff|",
              max_diff(full_weights(run.policy), tp2["weights"]), 0.0)
        check(topic, "TP2 -> TP1 load_checkpoint: adam moments max |diff|",
              max_diff(full_exp_avg(run), tp2["exp_avg"]), 0.0)
        expect(topic, "TP2 -> TP1 load_checkpoint: scheduler restored",
               run.scheduler.num_steps == 2)
        losses = run.steps(2, 1)
        expect(topic, "TP1 training continues from the resharded state",
               bool(torch.isfinite(losses).all()))

        # Architectures that do not fit: the error names the checkpoint, the first tensor that
        # differs with both shapes, and the dimension.
        for what, cfg, needles in (
                ("hidden size", {"hidden_size": 48},
                 ("embedding.word_embeddings.weight of shape (1152, 32), the model (1152, 48)",
                  "hidden size differs")),
                ("layers", {"num_layers": 3}, ("shape (2, 32), the model (3, 32)",
                                               "number of layers differs")),
                ("ffn hidden size", {"ffn_hidden_size": 96},
                 ("decoder.layers.mlp.linear_fc2.weight", "ffn hidden size differs")),
                ("query groups", {"num_query_groups": 4},
                 ("decoder.layers.self_attention.linear_qkv.weight",
                  "attention heads, query groups or head size differs")),
                ("no qkv bias", {"add_qkv_bias": False}, ("linear_qkv.bias",)),
                ("vocabulary", {"vocab_size": 1000}, ("vocabulary",))):
            model = build_gpt_model(GPTConfig(**{**vars(CFG), **cfg}),
                                    use_transformer_engine=False)
            raises("errors", f"{what} mismatch raises", lambda: load_model_weights(ckpt, model),
                   str(ckpt), *needles)

        dist_opt = distributed_optimizer_resume(root / "dist_opt")

        tp1_ckpt = root / "tp1_weights"
        save_checkpoint(tp1_ckpt, model=run.policy, state=run.state(3))
        return {"weights": full_weights(run.policy), "logits": eval_logits(run.policy),
                "dist_opt": dist_opt}


def distributed_optimizer_resume(ckpt):
    """Resume bitwise at TP=1, DP=2 with the optimizer state sharded across the DP ranks."""
    topic = "dist_opt"
    run = Run(distributed_optimizer=True)
    run.steps(0, 1)
    save_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                    state=run.state(1))
    saved = full_weights(run.policy)
    losses = run.steps(1, 2)
    final = run.weights()
    set_seed(SEED + 3)
    run = Run(distributed_optimizer=True)
    state = load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                            scheduler=run.scheduler)
    expect(topic, "each data-parallel rank gets its own trainer state back",
           state == run.state(1))
    resumed = run.steps(1, 2)
    expect(topic, "distributed optimizer: losses after resume bitwise equal",
           torch.equal(resumed, losses))
    expect(topic, "distributed optimizer: weights after resume bitwise equal",
           bitwise(run.weights(), final))
    expect(topic, "the optimizer state was sharded over 2 data-parallel ranks",
           dist.get_world_size(parallel_state.get_data_parallel_group()) == 2)
    return saved


def distributed_optimizer_reshard(ckpt, saved):
    """The TP=1, DP=2 distributed optimizer's checkpoint into TP=2, DP=1."""
    topic = "dist_opt"
    run = Run(distributed_optimizer=True)
    load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer, scheduler=run.scheduler)
    check(topic, "DP2 -> TP2 distributed optimizer: weights max |diff|",
          max_diff(full_weights(run.policy), saved), 0.0)
    states = list(run.optimizer.chained_optimizers[0].optimizer.state.values())
    expect(topic, "DP2 -> TP2 distributed optimizer: adam state loaded (step 1, moments set)",
           len(states) > 0 and all(s["step"].item() == 1 and s["exp_avg"].abs().max() > 0
                                   and s["exp_avg_sq"].abs().max() > 0 for s in states))
    expect(topic, "DP2 -> TP2 distributed optimizer: scheduler restored",
           run.scheduler.num_steps == 1)
    expect(topic, "DP2 -> TP2 distributed optimizer: training continues",
           bool(torch.isfinite(run.steps(1, 1)).all()))


def phase_c_tp2(root, tp1):
    topic = "reshard"
    with model_parallel(2, 1, seed=SEED + 4):
        model = build_gpt_model(CFG, use_transformer_engine=False)
        load_model_weights(root / "tp1_weights", model)
        check(topic, "TP1 -> TP2 load_model_weights: unsharded weights max |diff|",
              max_diff(full_weights(model), tp1["weights"]), 0.0)
        check(topic, "TP1 -> TP2 load_model_weights: logits max |diff| vs the TP1 model",
              (eval_logits(model) - tp1["logits"]).abs().max(), 1e-5)
        distributed_optimizer_reshard(root / "dist_opt", tp1["dist_opt"])


def phase_d_pp2(root, tp1):
    """Pipeline stages load and save their own layers (and the tied output layer)."""
    topic = "reshard"
    with model_parallel(1, 2, seed=SEED + 5):
        model = build_gpt_model(CFG, use_transformer_engine=False)
        load_model_weights(root / "tp1_weights", model)
        weights = full_weights(model)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        check(topic, f"TP1 -> PP2 load_model_weights: stage {stage} weights max |diff|",
              max_diff(weights, {k: tp1["weights"][k] for k in weights}), 0.0)
        expect(topic, f"PP2 stage {stage} holds its part of the layers", 0 < len(weights) < 16)
        save_checkpoint(root / "pp2_weights", model=model, state={"global_step": 0})
    with model_parallel(1, 1, seed=SEED + 6):
        model = build_gpt_model(CFG, use_transformer_engine=False)
        load_model_weights(root / "pp2_weights", model)
        check(topic, "PP2 -> TP1 load_model_weights: weights max |diff|",
              max_diff(full_weights(model), tp1["weights"]), 0.0)


def single_process(root):
    """No launcher (a world of one process): the same resume round trip."""
    topic = "single"
    with model_parallel(1, 1, seed=SEED):
        run = Run()
        run.steps(0, 1)
        ckpt = save_checkpoint(root / "single", model=run.policy, optimizer=run.optimizer,
                               scheduler=run.scheduler, snapshot=run.snapshot,
                               state=run.state(1))
        losses, final = run.steps(1, 2), run.weights()
        set_seed(SEED + 1)
        run = Run()
        state = load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                                scheduler=run.scheduler, snapshot=run.snapshot)
        expect(topic, "trainer state restored", state == run.state(1))
        expect(topic, "losses after resume bitwise equal", torch.equal(run.steps(1, 2), losses))
        expect(topic, "weights after resume bitwise equal", bitwise(run.weights(), final))
        expect(topic, "latest_checkpoint finds it", latest_checkpoint(root) == ckpt)
        guarded("sgd", sgd_resume, root / "sgd")
        guarded("integrity", integrity, root, ckpt, run)
        guarded("messages", messages, root, ckpt, run)


def sgd_resume(ckpt):
    """SGD with momentum (megatron builds it without a state initialiser): the momentum comes
    back and the resumed steps equal the uninterrupted ones bitwise."""
    topic = "sgd"
    run = Run(optimizer="sgd")
    run.steps(0, 2)
    save_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer, scheduler=run.scheduler,
                    state=run.state(2))
    momentum = momentum_buffers(run)
    expect(topic, "every parameter has a non-zero momentum buffer at save",
           len(momentum) == len(list(run.policy.parameters()))
           and all(m.abs().max() > 0 for m in momentum.values()))
    losses, final = run.steps(2, 2), run.weights()
    set_seed(SEED + 1)
    run = Run(optimizer="sgd")
    state = load_checkpoint(ckpt, model=run.policy, optimizer=run.optimizer,
                            scheduler=run.scheduler)
    expect(topic, "SGD: trainer state restored", state == run.state(2))
    expect(topic, "SGD: momentum buffers bitwise restored",
           bitwise(momentum_buffers(run), momentum))
    expect(topic, "SGD: losses after resume bitwise equal", torch.equal(run.steps(2, 2), losses))
    expect(topic, "SGD: weights after resume bitwise equal", bitwise(run.weights(), final))


def integrity(root, ckpt, run):
    """Checksums recorded at save and verified at load; checkpoints without them still load."""
    topic = "integrity"
    records = json.loads((ckpt / MARKER).read_text()).get("files")
    expect(topic, "the marker records every other file with the size and CRC-32 recomputed here",
           records == recomputed_records(ckpt) and ".metadata" in records
           and any(name.endswith(".distcp") for name in records))
    damaged = root / "damaged"
    shutil.copytree(ckpt, damaged)
    data_file = sorted(damaged.glob("*.distcp"))[0]
    flip_byte(data_file)
    before = run.weights()
    message = f"file {data_file.name} is corrupt: checksum mismatch"
    raises(topic, "load_checkpoint with a flipped byte in a data file",
           lambda: load_checkpoint(damaged, model=run.policy, optimizer=run.optimizer,
                                   scheduler=run.scheduler, snapshot=run.snapshot),
           str(damaged), message)
    raises(topic, "load_model_weights with a flipped byte in a data file",
           lambda: load_model_weights(damaged, run.policy), str(damaged), message)
    expect(topic, "nothing was loaded from the damaged checkpoint", bitwise(run.weights(), before))
    flip_byte(data_file)  # repaired
    load_model_weights(damaged, run.policy)
    repaired = run.weights()
    load_model_weights(ckpt, run.policy)
    expect(topic, "once repaired it loads, the weights of the original",
           bitwise(repaired, run.weights()))

    old = root / "saved_before_checksums"
    shutil.copytree(ckpt, old)
    edit_marker(old, lambda marker: marker.pop("files", None))
    state = load_checkpoint(old, model=run.policy, optimizer=run.optimizer,
                            scheduler=run.scheduler, snapshot=run.snapshot)
    expect(topic, "a checkpoint whose marker records no checksums still loads",
           state == run.state(1) and bitwise(run.weights(), repaired))


def messages(root, ckpt, run):
    """What a user is told about a damaged, foreign or incomplete checkpoint and a full disk."""
    topic = "messages"
    hf = root / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    raises(topic, "a Hugging Face folder given as a checkpoint",
           lambda: load_model_weights(hf, run.policy), str(hf), "Hugging Face",
           f"nemo-anchored convert hf-to-mcore --hf {hf} --out OUT")

    folder = root / "resumable"
    folder.mkdir()
    complete, staged = folder / "step_0000001", folder / "step_0000002.tmp"
    shutil.copytree(ckpt, complete)
    shutil.copytree(ckpt, staged)  # marked: caught between marker and rename
    raises(topic, "resuming from a .tmp directory",
           lambda: load_checkpoint(staged, model=run.policy), str(staged), "incomplete save",
           f"use {complete}, the latest complete checkpoint")

    # Checkpoints saved before checksums: the tensor index names a missing or truncated data
    # file; anything else unreadable is called corrupt, not an architecture mismatch. (A world
    # of one writes one or two data files, and common.pt only before megatron-core 0.19.)
    data = sorted(p.name for p in ckpt.glob("*.distcp"))
    writes_common_file = (ckpt / "common.pt").exists()
    cases = [("a truncated data file", lambda d: truncate(d / data[0]),
              (f"file {data[0]} is truncated",)),
             ("a missing data file", lambda d: (d / data[-1]).unlink(),
              (f"file {data[-1]} is missing",)),
             ("a truncated tensor index", lambda d: truncate(d / ".metadata"),
              ("file .metadata (its tensor index) is missing or corrupt",))]
    if writes_common_file:
        cases.append(("a truncated common.pt", lambda d: truncate(d / "common.pt"),
                      ("a file is missing, truncated or corrupt",)))
    for what, damage, needles in cases:
        old = root / f"old_{what.replace(' ', '_')}"
        shutil.copytree(ckpt, old)
        edit_marker(old, lambda marker: marker.pop("files", None))
        damage(old)
        raises(topic, f"a checkpoint without checksums with {what}",
               lambda: load_checkpoint(old, model=run.policy, optimizer=run.optimizer,
                                       scheduler=run.scheduler, snapshot=run.snapshot),
               str(old), *needles)

    # A checkpoint of megatron-core 0.19 or later (its common state inside the torch_dist files,
    # no common.pt) where this megatron-core, which wrote a common.pt, reads only that: stood
    # in for by this checkpoint without its common.pt and with 0.19.2 recorded as its writer.
    if writes_common_file:
        newer = root / "written_by_megatron_core_0_19"
        shutil.copytree(ckpt, newer)
        (newer / "common.pt").unlink()
        edit_marker(newer, lambda marker: (marker["files"].pop("common.pt"),
                                           marker.update(megatron_core="0.19.2")))
        before = run.weights()
        raises(topic, "a checkpoint of megatron-core 0.19.2", lambda: load_model_weights(
            newer, run.policy), str(newer), "no common.pt (megatron-core 0.19.2 wrote it)",
            f"this megatron-core {megatron.core.__version__} reads only common.pt",
            "Load it with megatron-core >= 0.19")
        expect(topic, "nothing was loaded from the newer megatron-core's checkpoint",
               bitwise(run.weights(), before))

    # A full disk: every write's fsync fails as on a full file system (the writer processes
    # megatron forks inherit the stand-in).
    fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = full_disk
    try:
        raises(topic, "a full disk during a save",
               lambda: save_checkpoint(folder / "step_0000003", model=run.policy,
                                       optimizer=run.optimizer, state=run.state(3)),
               f"saving checkpoint {folder / 'step_0000003'} failed: no space left on {folder}")
    finally:
        os.fsync = fsync
    expect(topic, "after the failed save the complete checkpoint is still the one to resume",
           latest_checkpoint(folder) == complete)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", required=True)
    args = parser.parse_args()
    launched = "WORLD_SIZE" in os.environ
    init_process_group()
    root = Path(args.dir)
    if launched:
        tp2 = phase_a_resume_tp2(root)
        tp1 = phase_b_tp1(root, tp2)
        phase_c_tp2(root, tp1)
        phase_d_pp2(root, tp1)
    else:
        single_process(root)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, checks)
    shutdown()
    if RANK == 0:
        with open(args.out, "w") as f:
            json.dump([c for rank_checks in everything for c in rank_checks], f, indent=1)


if __name__ == "__main__":
    main()
