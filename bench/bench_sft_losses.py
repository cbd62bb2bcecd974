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
ours, gloo processes at TP > 1 with eager and compiled on the gathered full vocabulary, the
gather in their time). The labels are uniform over the full vocabulary (seed 0).

Writes JSON (with the device description) to bench/results/.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench_anchored_kl import (RESULTS, compare, device_description, gather_columns,
                               mean_weights, print_row, random_logits, run_processes,
                               start_tensor_parallel, time_steps, write_results)

LOSSES = ["cross_entropy", "reverse_kl"]
BACKENDS = ["eager", "compiled", "megatron", "liger", "fused", "torch"]
ONLY_CROSS_ENTROPY = {"megatron", "liger"}
DEFAULT_SHAPES = ["4096x32000", "2048x19008"]  # as bench_anchored_kl.py's


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
    if tp_group is None:
        def step():
            z.grad = None
            f(z, second).backward(weights)
        return step

    rank = torch.distributed.get_rank(tp_group)
    width = z.shape[-1]
    if loss == "reverse_kl":
        second = gather_columns(r, tp_group)  # the reference is frozen: gathered once

    def gathered_step():  # the baselines see the full vocabulary on every rank
        z_full = gather_columns(z.detach(), tp_group).requires_grad_()
        f(z_full, second).backward(weights)
        z.grad = z_full.grad[:, rank * width:(rank + 1) * width].contiguous()
    return gathered_step


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


def run_in_subprocess(args, backend, loss, shape, tp) -> dict | None:
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="ROWSxV (full)")
    parser.add_argument("--backends", nargs="+", default=BACKENDS, choices=BACKENDS)
    parser.add_argument("--tp", nargs="+", type=int, default=None,
                        help="tensor-parallel sizes (default: 1 and, on the CPU, 2)")
    parser.add_argument("--tp-shapes", nargs="+", default=DEFAULT_SHAPES[:1],
                        help="the shapes run at TP > 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kept", type=float, default=1.0,
                        help="the share of tokens a random loss mask keeps in the mean")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
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

    device = device_description(args.device)
    tps = args.tp or ([1, 2] if args.device == "cpu" else [1])
    if args.device != "cpu" and tps != [1]:
        parser.error("--tp > 1 runs on the CPU only (gloo processes)")
    print(f"device: {device['name']} ({device['kind']}, {device['threads']} threads), "
          f"dtype {args.dtype}, median of {args.repeats}; times forward + backward of the mean "
          f"over {args.kept:.0%} of the tokens")
    rows_out = []
    for tp in tps:
        for shape in (args.shapes if tp == 1 else args.tp_shapes):
            for loss in args.losses:
                runs = {name: run_in_subprocess(args, name, loss, shape, tp)
                        for name in args.backends}
                ratios = compare(runs)
                print_row(shape, loss, tp, runs, ratios)
                rows_out.append({"shape": shape, "loss": loss, "tp": tp, "runs": runs,
                                 "ours_vs": ratios, "load_average": list(os.getloadavg())})
    print("MiB: peak memory over the resident inputs during forward + backward (the "
          "gradient buffer alone is rows x V_local x itemsize); n/a: cannot run here")
    suffix = "" if tps == [1] else "_tp" + "".join(map(str, tps))
    if args.kept < 1:
        suffix += f"_kept{round(100 * args.kept)}"
    write_results(args.out or RESULTS / f"sft_losses_{device['kind']}_{args.dtype}{suffix}.json",
                  {"device": device, "dtype": args.dtype, "repeats": args.repeats,
                   "kept": args.kept, "results": rows_out})


if __name__ == "__main__":
    main()
