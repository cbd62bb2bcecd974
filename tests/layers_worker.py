"""Worker for tests/test_attention.py; every comparison becomes a named check in JSON.

One torchrun world of 2 processes runs every comparison, re-initialising megatron's groups
between layouts (a process start costs ~10 s on the 2-core CI machines):
  A. TP=2, fp32: SDPA core attention against megatron's DotProductAttention (the reference),
     same weights, grouped-query heads (2 heads, 1 group per rank), the sft and the anchored
     loss, causal batches and packed ones (block-diagonal causal mask, restarting positions).
  B. TP=2, fp32, hidden and attention dropout 0.1: activation recomputation (selective, full
     uniform, full block) against none, same seed, for SDPA and for megatron's attention.
  C. bf16 with untied embeddings: PP=2 through 1F1B against TP=1 (PP=1), then, still at TP=1,
     greedy decoding through megatron's KV cache with SDPA against megatron's attention (fp32).
Compared per micro-batch: the summed loss; the policy's logits (this rank's real vocabulary
columns); every policy gradient (after megatron's gradient finalisation). Rank 0 writes all
ranks' checks to --out.
"""
import argparse
import json
import os
from dataclasses import replace

import torch
import torch.distributed as dist

from tests.launch import CheckLog
from nemo_anchored.config import AnchorConfig, GPTConfig, LoggingConfig, RunConfig
from nemo_anchored.data.packing import block_causal_mask, restarting_positions
from nemo_anchored.eval.generate import greedy_generate_ids
from nemo_anchored.models.co_resident import CoResidentModels
from nemo_anchored.models.gpt import build_gpt_model, full_state_dict_key, load_full_state_dict
from nemo_anchored.parallel.distributed import init_process_group, model_parallel, set_seed, \
    shutdown
from nemo_anchored.parallel.schedule import forward_backward, wrap_for_training
from nemo_anchored.training.methods import MethodLoss

from megatron.core import parallel_state

CFG = GPTConfig(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,  # grouped-query attention at TP=1 and TP=2 (2 heads per group)
    ffn_hidden_size=96,
    vocab_size=1100,
    max_seq_len=32,
)
RANK = int(os.environ.get("RANK", "0"))
SEED = 1234
MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 2, 2, 16
# fp32: the two attentions and the recomputed forward differ only in summation order
# (observed up to ~1e-6 relative).
TOL = 1e-5
# Segment ids of a packed micro-batch: examples numbered from 1, 0 the padding tail.
SEGMENTS = torch.tensor([[1] * 5 + [2] * 7 + [0] * 4, [1] * 9 + [2] * 3 + [3] * 4])

LOG = CheckLog(RANK, default_limit=TOL)
check, expect, checks = LOG.check, LOG.expect, LOG.items


def micro_batches(packed: bool):
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(MICRO_BATCHES):
        loss_mask = (torch.rand(MICRO_BATCH_SIZE, SEQ, generator=g) > 0.25).float()
        batch = {
            "tokens": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g),
            "labels": torch.randint(0, CFG.vocab_size, (MICRO_BATCH_SIZE, SEQ), generator=g),
            "position_ids": torch.arange(SEQ).expand(MICRO_BATCH_SIZE, SEQ),
            "loss_mask": loss_mask,
        }
        if packed:
            batch.update(position_ids=restarting_positions(SEGMENTS),
                         attention_mask=block_causal_mask(SEGMENTS),
                         loss_mask=loss_mask * (SEGMENTS > 0))
        batches.append(batch)
    return batches


def method_loss(method: str) -> MethodLoss:
    cfg = RunConfig(method=method, logging=LoggingConfig(diagnostics_every=0),
                    anchor=AnchorConfig(alpha=0.5, interpolation="logit"))
    return MethodLoss.for_config(cfg)


def real_columns(logits):
    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    return logits[..., : max(0, min(shard, CFG.vocab_size - start))]


def build_stack(cfg, n_models, weights=None):
    """Policy (+ reference, snapshot), from the seed or from unsharded ``weights``."""
    models = [build_gpt_model(cfg) for _ in range(n_models)]
    for model, state in zip(models, weights or ()):
        load_full_state_dict(model, state)
    models[0].config.calculate_per_token_loss = True  # as the trainer runs it
    return CoResidentModels(*models)


def full_weights(stack):
    return [{k: v.detach().clone() for k, v in m.state_dict().items()
             if not k.endswith("_extra_state")} for m in (stack.policy, *stack.frozen_models)]


def train_step(stack, batches, method, seed=SEED):
    """One forward+backward over ``batches``: (loss sum per micro-batch, policy logits per
    micro-batch, policy gradients by TP=1 name); the first two None off the last stage."""
    ddp = wrap_for_training(stack)
    loss, logits = method_loss(method), []

    def recording(policy, reference, snapshot, batch):
        logits.append(real_columns(policy.detach()).clone())
        return loss(policy, reference, snapshot, batch)

    set_seed(seed)  # the same dropout masks for runs that must agree
    logged = forward_backward(ddp, iter(batches), recording, num_microbatches=len(batches),
                              seq_length=SEQ, micro_batch_size=MICRO_BATCH_SIZE)
    grads = {full_state_dict_key(stack.policy, name): p.main_grad.clone()
             for name, p in stack.policy.named_parameters()}
    losses = torch.stack([d["loss"] for d in logged]) if logged else None
    return losses, (logits or None), grads


def compare(topic, tag, got, want, limit=TOL):
    """Relative differences: summed loss, each micro-batch's logits, each gradient."""
    (losses, logits, grads), (base_losses, base_logits, base_grads) = got, want
    if losses is not None:
        check(topic, f"{tag}: summed loss", ((losses.sum() - base_losses.sum()).abs()
                                             / base_losses.sum().abs()), limit)
        for i, (a, b) in enumerate(zip(logits, base_logits)):
            check(topic, f"{tag}: logits of micro-batch {i}, max |diff| / max |logit|",
                  (a.float() - b.float()).abs().max() / b.float().abs().max(), limit)
    # Under PP each stage holds some of them; the test counts the checks of all stages.
    expect(topic, f"{tag}: this rank's policy parameters exist in the baseline",
           0 < len(grads) and grads.keys() <= base_grads.keys())
    for name, grad in grads.items():
        want_grad = base_grads[name].float()
        # Relative to the gradient's size, so that small gradients cannot pass trivially.
        check(topic, f"{tag}: grad {name} max |diff| / max |grad|",
              (grad.float() - want_grad).abs().max() / want_grad.abs().max(), limit)


def sdpa_against_local():
    """A. SDPA == megatron's DotProductAttention at TP=2, fp32."""
    for method, n_models in (("sft", 1), ("anchored", 3)):
        set_seed(SEED)
        local = build_stack(replace(CFG, attention="local"), n_models)
        sdpa = build_stack(replace(CFG, attention="sdpa"), n_models)
        for src, dst in zip((local.policy, *local.frozen_models),
                            (sdpa.policy, *sdpa.frozen_models)):
            dst.load_state_dict(src.state_dict(), strict=True)  # strict: the same keys
        if method == "sft":
            expect("sdpa", "the core attention is the one configured",
                   type(sdpa.policy.decoder.layers[0].self_attention.core_attention).__name__
                   == "SDPAttention" and type(local.policy.decoder.layers[0].self_attention
                                              .core_attention).__name__ == "DotProductAttention")
            expect("sdpa", "the same distributed-checkpoint keys",
                   local.policy.sharded_state_dict().keys()
                   == sdpa.policy.sharded_state_dict().keys())
        for packed in (False, True):
            batches = micro_batches(packed)
            tag = f"{method}, {'packed' if packed else 'causal'}"
            compare("sdpa", tag, train_step(sdpa, batches, method),
                    train_step(local, batches, method))


def recompute_against_none():
    """B. Recomputation == none, dropout on, TP=2: same masks redrawn, same results. SDPA with
    the anchored loss on packed batches (the mask goes through the checkpoint); megatron's
    attention with sft on causal ones (its causal mask is rebuilt when recomputing)."""
    dropout = replace(CFG, hidden_dropout=0.1, attention_dropout=0.1)
    variants = {"selective": dict(recompute="selective"),
                "full uniform 2": dict(recompute="full", recompute_method="uniform",
                                       recompute_num_layers=2),
                "full block 1": dict(recompute="full", recompute_method="block",
                                     recompute_num_layers=1)}
    for attention, method, packed in (("sdpa", "anchored", True), ("local", "sft", False)):
        n_models = 3 if method == "anchored" else 1
        batches = micro_batches(packed)

        def step(settings, seed=SEED):
            set_seed(SEED)  # the same initial weights: recomputation adds no parameters
            cfg = replace(dropout, **{"attention": attention, **settings})
            return train_step(build_stack(cfg, n_models), batches, method, seed)

        baseline = step({})
        other_seed = step({}, SEED + 1)
        if baseline[0] is not None:
            expect("recompute", f"{attention}: dropout is on (another seed, another loss)",
                   (other_seed[0] - baseline[0]).abs().max() > 1e-4)
        for name, settings in variants.items():
            if attention == "local" and name != "selective":
                continue  # full recomputation does not look inside the layer
            compare("recompute", f"{attention} {method}, {name}", step(settings), baseline)
        if attention == "local":
            # On the CPU, PyTorch's math kernel draws the attention-dropout mask as megatron's
            # nn.Dropout does (one bernoulli over the [b, heads, s, s] probabilities) from the
            # same tracker stream: equal results. GPU kernels draw in-kernel (docstring of
            # models/attention.py); should a PyTorch release change the CPU kernel, only this
            # check is affected.
            compare("recompute", "sft, dropout on: SDPA == megatron's attention (CPU)",
                    step({"attention": "sdpa"}), baseline)
    direct_backward_check(dropout)


def direct_backward_check(cfg):
    """``loss.backward()`` outside megatron's schedules (which call the autograd engine
    directly) with megatron's attention recomputed: the CPU shims cover that backward too."""
    batch = micro_batches(packed=False)[0]
    grads = []
    for recompute in (None, "selective"):
        set_seed(SEED)
        model = build_gpt_model(replace(cfg, attention="local", recompute=recompute))
        logits = model(batch["tokens"], batch["position_ids"], None)
        real_columns(logits).float().pow(2).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for i, (got, want) in enumerate(zip(*grads)):
        check("recompute", f"tensor.backward(), local selective: grad {i} max |diff| / max",
              (got - want).abs().max() / want.abs().max())


def bf16_pipeline_against_tp1():
    """C. bf16, untied embeddings: PP=2 (1F1B) == PP=1, then KV-cache decoding at TP=1."""
    cfg = replace(CFG, dtype="bfloat16", tie_embeddings=False)
    batches = micro_batches(packed=False)
    with model_parallel(1, 1, seed=SEED):
        stack = build_stack(cfg, 3)
        weights = full_weights(stack)
        baseline = {method: train_step(build_stack(cfg, n, weights), batches, method)
                    for method, n in (("sft", 1), ("anchored", 3))}
        decoding_checks()
    with model_parallel(1, 2, seed=SEED + 1):
        expect("bf16_pp2", "the output layer is untied",
               not build_gpt_model(cfg).share_embeddings_and_output_weights)
        for method, n in (("sft", 1), ("anchored", 3)):
            # The same bf16 operations on the same inputs in both layouts: the stages exchange
            # bf16 activations, which PP=1 also hands from layer to layer, and the fp32 main
            # grads sum the same terms. Any difference is summation order inside a kernel;
            # 1 bf16 ulp (2^-8 relative) allows it, and a real error (a wrong stream, a missed
            # gradient, a layer's output dropped) is orders of magnitude larger.
            compare("bf16_pp2", f"{method}, bf16 PP=2", train_step(
                build_stack(cfg, n, weights), batches, method), baseline[method], 2.0 ** -8)


def decoding_checks():
    """Greedy decoding through megatron's KV cache (the single-query steps attend to every
    cached key) gives megatron's attention's tokens with SDPA too; fp32, TP=1."""
    set_seed(SEED)
    local = build_gpt_model(replace(CFG, attention="local"))
    sdpa = build_gpt_model(replace(CFG, attention="sdpa"))
    sdpa.load_state_dict(local.state_dict())
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (3, 5, 5)]
    tokens = [greedy_generate_ids(m, prompts, vocab_size=CFG.vocab_size, stop_ids=set(),
                                  max_new_tokens=8) for m in (local, sdpa)]
    expect("sdpa", "KV-cache decoding: the same greedy tokens (8 per prompt)",
           tokens[0] == tokens[1] and all(len(t) == 8 for t in tokens[1]))


def two_process_checks():
    init_process_group()
    with model_parallel(2, 1, seed=SEED):
        sdpa_against_local()
        recompute_against_none()
    bf16_pipeline_against_tp1()
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, checks)
    shutdown()
    return [c for rank_checks in everything for c in rank_checks]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    results = two_process_checks()
    if RANK == 0:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
