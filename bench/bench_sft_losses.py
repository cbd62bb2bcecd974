"""The SFT-stage losses (token cross-entropy, reverse KL) against what a user would run instead:
forward + backward time, peak extra memory and the ratios, side by side in one run.

    python bench/bench_sft_losses.py                 # CPU, fp32, both losses, TP 1 and 2
    python bench/bench_sft_losses.py --device cuda --dtype bfloat16

Implementations (``--backends``):
- ``eager``: cross-entropy as a Hugging Face model computes it (the logits upcast to fp32,
  ``F.cross_entropy(..., reduction="none")``); the reverse KL KL(p_theta || p_ref) from fp32
  log-softmaxes, ``F.kl_div(log p_ref, log p_theta, log_target=True).sum(-1)``; full
  vocabulary, autograd for the gradient;
- ``compiled``: the same function under ``torch.compile`` (compiled in the warm-up steps);
- ``megatron``: megatron-core's ``vocab_parallel_cross_entropy``, what a Megatron or NeMo SFT
  recipe runs (its ``cross_entropy_loss_fusion`` is off by default), on the shards at TP > 1
  as ours; cross-entropy only (megatron-core has no reverse KL);
- ``liger``: Liger-Kernel's ``LigerCrossEntropyLoss`` (Triton: GPU only), the masked tokens
  given its ignore_index and its mean as the reduction; cross-entropy only;
- ``fused``: ours (``token_cross_entropy`` / ``reverse_kl``, nemo_anchored._C); ``torch``: our
  float64-capable reference backend.

Every step is a forward + backward of the mean over the tokens in the loss, all of them or with
``--kept F`` a random loss mask, as in bench_anchored_kl.py (whose measurement this shares:
fresh processes per configuration, peak memory over the inputs, the copy bandwidth alongside
ours, gloo processes at TP > 1 with eager and compiled on the gathered full vocabulary: the
policy's gather in their time, the frozen reference's done once before the timed steps, where
bench_anchored_kl.py gathers the reference and snapshot in every step). The labels are uniform
over the full vocabulary (seed 0).

Writes JSON (with the device description) to bench/results/.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

from bench_anchored_kl import (baseline_step, comparison_parser, gather_columns, mean_weights,
                               random_logits, run_comparison, run_processes,
                               start_tensor_parallel, time_steps)

LOSSES = ["cross_entropy", "reverse_kl"]
BACKENDS = ["eager", "compiled", "megatron", "liger", "fused", "torch"]
ONLY_CROSS_ENTROPY = {"megatron", "liger"}


def eager_cross_entropy(z, labels):
    return F.cross_entropy(z.float(), labels, reduction="none")


def eager_reverse_kl(z, r):
    log_p = torch.log_softmax(z.float(), -1)
    log_ref = torch.log_softmax(r.float(), -1)
    return F.kl_div(log_ref, log_p, log_target=True, reduction="none").sum(-1)


def liger_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def make_step(backend, loss, z, r, labels, weights, tp_group):
    """A forward + backward of one implementation; the policy's gradient lands in z.grad."""
    if backend in ("fused", "torch"):
        from nemo_anchored.ops import reverse_kl, token_cross_entropy

        def ours_step():
            z.grad = None
            out = (token_cross_entropy(z, labels, tp_group=tp_group, backend=backend,
                                       weights=weights) if loss == "cross_entropy" else
                   reverse_kl(z, r, tp_group=tp_group, backend=backend, weights=weights))
            out.sum().backward()
        return ours_step
    if backend == "megatron":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        def megatron_step():  # its TP group is parallel_state's
            z.grad = None
            vocab_parallel_cross_entropy(z, labels).backward(weights)
        return megatron_step
    if backend == "liger":
        from liger_kernel.transformers import LigerCrossEntropyLoss
        cross_entropy = LigerCrossEntropyLoss(ignore_index=-100, reduction="mean")
        masked = torch.where(weights > 0, labels, torch.full_like(labels, -100))

        def liger_step():
            z.grad = None
            cross_entropy(z, masked).backward()
        return liger_step
    f = eager_cross_entropy if loss == "cross_entropy" else eager_reverse_kl
    if backend == "compiled":
        f = torch.compile(f, dynamic=False)
    second = labels if loss == "cross_entropy" else r
    if loss == "reverse_kl" and tp_group is not None:
        second = gather_columns(r, tp_group)  # frozen: gathered once, before the timed steps
    return baseline_step(z, lambda policy: f(policy, second), weights, tp_group)


def measure_one(backend, loss, rows, cols, dtype, device, repeats, tp, kept) -> dict | None:
    """Time and peak memory of one configuration (on rank 0 at TP > 1; None elsewhere)."""
    if backend == "megatron":
        from megatron.core import parallel_state

        from nemo_anchored.parallel.distributed import init_model_parallel
        init_model_parallel(tp)
        tp_group = parallel_state.get_tensor_model_parallel_group() if tp > 1 else None
    else:
        tp_group = start_tensor_parallel(tp)
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    z, r, _ = random_logits(rows, cols, "live", dtype, device, tp, rank)
    z.requires_grad_()
    labels = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(0))
    labels = labels.to(device)
    weights = mean_weights(rows, kept, device)
    step = make_step(backend, loss, z, r, labels, weights, tp_group)
    record = time_steps(step, z, 1 if loss == "cross_entropy" else 2, device, repeats, tp_group,
                        ours=backend == "fused", with_copy=backend == "fused" and kept == 1)
    if record is not None:
        record.update(backend=backend, loss=loss, rows=rows, cols=cols, tp=tp, dtype=str(dtype),
                      kept=kept)
    return record


def run_in_subprocess(args, backend, shape, loss, tp) -> dict | None:
    """One configuration in fresh processes; None when the implementation cannot run here."""
    if backend in ONLY_CROSS_ENTROPY and loss != "cross_entropy":
        return None
    if backend == "liger" and (not liger_available() or tp > 1):
        return None
    rows, cols = map(int, shape.split("x"))
    return run_processes([sys.executable, __file__, "--one", backend, loss, str(rows),
                          str(cols), "--device", args.device, "--dtype", args.dtype,
                          "--repeats", str(args.repeats), "--tp", str(tp), "--kept",
                          str(args.kept)], tp, args.threads)


def main():
    parser = comparison_parser(__doc__.splitlines()[0], BACKENDS)
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--one", nargs=4, metavar=("BACKEND", "LOSS", "ROWS", "COLS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    args.threads = torch.get_num_threads()

    if args.one:
        backend, loss, rows, cols = args.one
        record = measure_one(backend, loss, int(rows), int(cols), dtype, args.device,
                             args.repeats, args.tp[0] if args.tp else 1, args.kept)
        if record is not None:
            print(json.dumps(record))
        return

    run_comparison(args, args.losses, "loss", args.backends,
                   lambda name, shape, loss, tp: run_in_subprocess(args, name, shape, loss, tp),
                   "sft_losses")


if __name__ == "__main__":
    main()
