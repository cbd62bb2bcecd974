"""Worker for tests/test_engine_parallel.py; every comparison becomes a named check in JSON.

Under torchrun with 2 processes, one process pair runs every layout in turn, re-initialising
megatron's groups in between (each torchrun start costs ~10 s on the 2-core CI machines):
  A. TP=1, PP=1 (DP=2): policy, reference and snapshot built from a seed; their unsharded
     weights, logits, per-micro-batch losses and policy gradients are the baseline.
  B. TP=2: the same weights loaded into the shards (built from another seed first).
  C. PP=2 through megatron's 1F1B schedule, then the snapshot refresh and reference loading.
Without torchrun it checks the single-process path (a world of one, no launcher) with the
two-model (live mode) stack.

Each check has a topic (the pytest test that asserts it), a name and, for numeric checks, a
value that must not exceed its limit. Rank 0 writes all ranks' checks to --out.
"""

import argparse
import json
import math
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from tests.launch import CheckLog
from nemo_anchored.models.co_resident import CoResidentModels
from nemo_anchored.config import GPTConfig
from nemo_anchored.models.gpt import (
    build_gpt_model,
    full_state_dict_key,
    load_full_state_dict,
)
from nemo_anchored.parallel.distributed import (
    init_model_parallel,
    init_process_group,
    model_parallel,
    shutdown,
)
from nemo_anchored.parallel.schedule import forward_backward, wrap_for_training

from megatron.core import parallel_state, tensor_parallel

CFG = GPTConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=1100,  # padded to 1152 in every layout: 576 columns per rank at TP=2
    max_seq_len=32,
    add_qkv_bias=True,
    tie_embeddings=True,
)
RANK = int(os.environ.get("RANK", "0"))
SEED = 1234
MICRO_BATCHES = 4
MICRO_BATCH_SIZE = 2
SEQ = 16
TOL = 1e-5

LOG = CheckLog(RANK, default_limit=TOL)
check, expect, checks = LOG.check, LOG.expect, LOG.items


def micro_batches():
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(MICRO_BATCHES):
        loss_mask = (torch.rand(MICRO_BATCH_SIZE, SEQ, generator=g) > 0.25).float()
        loss_mask[:, :3] = 0.0  # a "prompt" that carries no loss
        batches.append({
            "tokens": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ),
            "labels": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g),
            "loss_mask": loss_mask,
        })
    return batches


def real_columns(logits):
    """This TP rank's logits restricted to real (non-padded) vocabulary columns."""
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    return logits[..., : max(0, min(shard, CFG.vocab_size - start))]


def stand_in_loss(policy, reference, snapshot, batch):
    """Cross-entropy plus squared distances to the frozen models' logits (a test loss only)."""
    # vocab_parallel_cross_entropy works in place on fp32 logits: give it a copy.
    per_token = tensor_parallel.vocab_parallel_cross_entropy(policy.clone(), batch["labels"])
    for frozen in (reference, snapshot):
        if frozen is not None:
            square = (real_columns(policy) - real_columns(frozen)).pow(2).sum(-1)
            per_token = per_token + 0.01 * tensor_parallel.reduce_from_tensor_model_parallel_region(
                square
            )
    mask = batch["loss_mask"]
    loss_sum = (per_token * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


def gather_vocab(logits):
    """Full-vocabulary logits (real columns only) from this rank's TP shard."""
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., : CFG.vocab_size]


def unshard(local, param):
    """The TP=1 tensor of a TP-sharded parameter (inverse of load_full_state_dict's split)."""
    group = parallel_state.get_tensor_model_parallel_group()
    tp = dist.get_world_size(group)
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local
    parts = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(parts, local.contiguous(), group=group)
    dim, stride = param.partition_dim, getattr(param, "partition_stride", 1)
    blocks = [torch.chunk(part, stride, dim=dim) for part in parts]
    return torch.cat([blocks[r][s] for s in range(stride) for r in range(tp)], dim=dim)


def capture_logits(ddp, batch):
    """Forward-only pass of one micro-batch through the schedule; the last stage's logits."""
    captured = []

    def capture(policy, reference, snapshot, batch):
        captured.append([None if t is None else t.detach().clone()
                         for t in (policy, reference, snapshot)])
        return policy.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    forward_backward(ddp, iter([batch]), capture, num_microbatches=1, seq_length=SEQ,
                     micro_batch_size=MICRO_BATCH_SIZE, forward_only=True)
    return captured[0] if captured else None


def forward_only_records_graph(ddp, batch):
    """Whether a forward-only pass through the schedule builds an autograd graph (it must not:
    the returned dicts would keep every micro-batch's activations alive)."""
    graphs = []

    def probe(policy, reference, snapshot, batch):
        graphs.append(policy.grad_fn is not None)
        return policy.sum() * 0.0, torch.tensor(1, dtype=torch.int), {}

    forward_backward(ddp, iter([batch]), probe, num_microbatches=1, seq_length=SEQ,
                     micro_batch_size=MICRO_BATCH_SIZE, forward_only=True)
    return graphs != [False]  # one probe, no graph


def run_layout(stack, ddp, batches):
    """Full-vocab logits of micro-batch 0, then one forward+backward over all micro-batches.

    Returns (logits or None, per-micro-batch [loss_sum, num_tokens] or None, policy gradients
    by unsharded parameter name); None where this rank is not the last pipeline stage.
    """
    logits = capture_logits(ddp, batches[0])
    if logits is not None:
        logits = [gather_vocab(t) for t in logits]
    ddp.zero_grad_buffer()
    logged = forward_backward(ddp, iter(batches), stand_in_loss, num_microbatches=MICRO_BATCHES,
                              seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE)
    grads = {}
    for name, param in stack.policy.named_parameters():
        grad = unshard(param.main_grad, param)
        if getattr(param, "is_embedding_or_output_parameter", False):
            grad = grad[: CFG.vocab_size]
        grads[full_state_dict_key(stack.policy, name)] = grad.clone()
    losses = torch.stack([d["loss"] for d in logged]) if logged else None
    return logits, losses, grads


def build_stack(num_models=3):
    return CoResidentModels(
        *[build_gpt_model(CFG, use_transformer_engine=False) for _ in range(num_models)]
    )


def check_frozen(tag, stack):
    frozen = [p for m in stack.frozen_models for p in m.parameters()]
    expect("frozen", f"{tag}: frozen params: requires_grad False, no grad, not in DDP buffers",
           len(frozen) > 0 and all(not p.requires_grad and p.grad is None
                                   and not hasattr(p, "main_grad") for p in frozen))
    expect("frozen", f"{tag}: frozen models stay in eval mode while the policy trains",
           stack.training and stack.policy.training
           and not any(m.training for m in stack.frozen_models))


def compare(topic, baseline, logits, losses, grads):
    base_logits, base_losses, base_grads = baseline
    if logits is not None:
        for name, got, want in zip(("policy", "reference", "snapshot"), logits, base_logits):
            check(topic, f"{name} logits max |diff|", (got - want).abs().max())
    if losses is not None:
        # Per-token mean of each micro-batch: what the schedule optimises (the sums are O(100)).
        mean, base_mean = losses[:, 0] / losses[:, 1], base_losses[:, 0] / base_losses[:, 1]
        check(topic, "per-micro-batch mean loss max |diff|", (mean - base_mean).abs().max())
        check(topic, "token counts equal", (losses[:, 1] - base_losses[:, 1]).abs().max(), 0.0)
    # Each rank compares the parameters of its own pipeline stage, unsharded over TP.
    expect(topic, "this rank holds policy parameters", len(grads) > 0)
    for name, grad in grads.items():
        want = base_grads[name]
        diff = (grad - want).abs().max()
        check(topic, f"grad {name} max |diff|", diff)
        # Relative to the gradient's size, so that small gradients cannot pass trivially.
        check(topic, f"grad {name} max |diff| / max |grad|", diff / want.abs().max(), 1e-4)


def load_baseline_weights(stack, full):
    for model, state in zip((stack.policy, stack.reference, stack.snapshot), full):
        load_full_state_dict(model, state)


def two_process_checks():
    init_process_group()
    batches = micro_batches()

    # A. Baseline at TP=1, PP=1. Both DP ranks build identical models from the same seed.
    with model_parallel(1, 1, seed=SEED):
        stack = build_stack()
        full = [{k: v.detach().clone() for k, v in m.state_dict().items()
                 if not k.endswith("_extra_state")}
                for m in (stack.policy, stack.reference, stack.snapshot)]
        ddp = wrap_for_training(stack)
        baseline = run_layout(stack, ddp, batches)
        check_frozen("TP1", stack)
        expect("checkpoint", "the stack's distributed-checkpoint state is the policy's",
               list(stack.sharded_state_dict()) == list(stack.policy.sharded_state_dict()))

    # B. TP=2, built from another seed: equal results prove the weights came from `full`.
    with model_parallel(2, 1, seed=SEED + 1):
        stack = build_stack()
        load_baseline_weights(stack, full)
        ddp = wrap_for_training(stack)
        compare("tp2", baseline, *run_layout(stack, ddp, batches))
        check_frozen("TP2", stack)
        # Shards of 576 columns: rank 0 holds only real ones, rank 1 the 52 padded ones.
        shard = capture_logits(ddp, batches[0])[0]
        real = real_columns(shard)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        padded = shard[..., real.shape[-1]:]
        expect("tp2", f"TP rank {tp_rank}: padded columns are -inf, the real ones finite",
               padded.shape[-1] == (0, 52)[tp_rank] and bool(torch.isneginf(padded).all())
               and bool(real.isfinite().all()))

    # C. PP=2: 1F1B with 4 micro-batches has warm-up, steady state and cool-down on stage 0.
    with model_parallel(1, 2, seed=SEED + 2):
        stack = build_stack()
        load_baseline_weights(stack, full)
        ddp = wrap_for_training(stack)
        compare("pp2", baseline, *run_layout(stack, ddp, batches))
        check_frozen("PP2", stack)
        expect("pp2", "stages exchange the policy, reference and snapshot streams",
               stack.adjust_tensor_shapes([(SEQ, 2, 64)], [(SEQ, 2, 64)])
               == ([(SEQ, 2, 192)], [(SEQ, 2, 192)]))

        # Move the policy, refresh the snapshot: its logits must equal the policy's exactly.
        with torch.no_grad():
            for param in stack.policy.parameters():
                param.add_(0.01 * torch.randn_like(param))
        stack.refresh_snapshot()
        refreshed = capture_logits(ddp, batches[0])
        # Load the policy's shard as reference weights: the reference must match it too.
        stack.reference.load_state_dict(stack.policy.state_dict(), strict=True)
        reloaded = capture_logits(ddp, batches[0])
        if refreshed is not None:
            policy, reference, snapshot = (real_columns(t) for t in refreshed)
            check("snapshot", "PP2: snapshot == policy after refresh_snapshot",
                  (snapshot - policy).abs().max(), 0.0)
            expect("snapshot", "PP2: reference still differs from the moved policy",
                   (reference - policy).abs().max() > 1e-3)
            policy, reference, _ = (real_columns(t) for t in reloaded)
            check("snapshot", "PP2: reference == policy after loading the policy's weights",
                  (reference - policy).abs().max(), 0.0)

    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, checks)
    shutdown()
    return [c for rank_checks in everything for c in rank_checks]


def check_optimizer_step(stack, ddp):
    """megatron's optimizer (with gradient clipping) holds and moves the policy's weights only."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optimizer = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, clip_grad=0.5),
                                       [ddp])
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    expect("single", "the optimizer holds exactly the policy's parameters",
           held == {id(p) for p in stack.policy.parameters()})
    before = {name: p.detach().clone() for name, p in stack.named_parameters()}
    _, grad_norm, _ = optimizer.step()
    moved = {name for name, p in stack.named_parameters() if not torch.equal(before[name], p)}
    expect("single", "a clipped optimizer step moves every policy weight and no frozen one",
           math.isfinite(grad_norm) and grad_norm > 0.5
           and moved == {name for name, _ in stack.named_parameters()
                         if name.startswith("module.")})


def single_process_checks():
    """No launcher: a world of one process, and the two-model stack (live mode)."""
    for attempt in range(2):  # the second round proves teardown leaves a clean process
        context = init_model_parallel(1, 1, seed=SEED)
        expect("single", f"round {attempt}: a world of one process",
               (context.world_size, context.tp_size, context.pp_size) == (1, 1, 1))
        stack = build_stack(num_models=2)
        ddp = wrap_for_training(stack)
        batches = micro_batches()
        logits = capture_logits(ddp, batches[0])
        expect("single", f"round {attempt}: no snapshot logits without a snapshot model",
               logits[2] is None)
        expect("single", f"round {attempt}: a forward-only pass records no autograd graph",
               not forward_only_records_graph(ddp, batches[0]))
        expect("single", f"round {attempt}: padded columns -inf, real ones finite",
               bool(torch.isneginf(logits[0][..., CFG.vocab_size:]).all())
               and bool(logits[0][..., : CFG.vocab_size].isfinite().all()))
        logged = forward_backward(ddp, iter(batches), stand_in_loss,
                                  num_microbatches=MICRO_BATCHES, seq_length=SEQ,
                                  micro_batch_size=MICRO_BATCH_SIZE)
        expect("single", f"round {attempt}: a finite loss per micro-batch",
               len(logged) == MICRO_BATCHES and all(d["loss"].isfinite().all() for d in logged))
        expect("single", f"round {attempt}: every policy parameter has a nonzero gradient",
               all(p.main_grad.abs().max() > 0 for p in stack.policy.parameters()))
        check_frozen(f"single round {attempt}", stack)
        if attempt == 0:
            check_optimizer_step(stack, ddp)
            bf16 = CoResidentModels(*[build_gpt_model(replace(CFG, dtype="bfloat16"))
                                      for _ in range(2)])
            with torch.no_grad():
                logits = bf16(batches[0]["tokens"], batches[0]["position_ids"])
            expect("single", "bfloat16 models give bfloat16 logits, padded columns -inf",
                   logits.policy.dtype == torch.bfloat16
                   and all(p.dtype == torch.bfloat16 for p in bf16.parameters())
                   and bool(torch.isneginf(logits.reference[..., CFG.vocab_size:]).all())
                   and bool(logits.reference[..., : CFG.vocab_size].isfinite().all()))
        shutdown()
        expect("single", f"round {attempt}: shutdown destroys the process group",
               not dist.is_initialized())
    return checks


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    launched = "WORLD_SIZE" in os.environ
    results = two_process_checks() if launched else single_process_checks()
    if not launched or int(os.environ["RANK"]) == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
