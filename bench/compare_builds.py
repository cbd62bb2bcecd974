"""Two builds of the extension's CPU kernels called in turn in one process: what a
kernel change gains, measured so that the host's drift reaches both builds alike (on the shared
2-core VM of the README's tables the speed of a pass over memory varied 2x within minutes, more
than most kernel changes move it).

    python bench/compare_builds.py BEFORE AFTER                    # both modes, first shape
    python bench/compare_builds.py BEFORE AFTER --sharded --cols 16000
    python bench/compare_builds.py BEFORE AFTER --dtype bfloat16 --rows 2048 --cols 19008
    python bench/compare_builds.py BEFORE AFTER --modes cross_entropy reverse_kl  # SFT stage

BEFORE and AFTER are checkouts with a built extension (nemo_anchored/_C*.so), e.g. a git
worktree at the older commit built with ``python setup.py build_ext --inplace``. Each build's
``_C`` is loaded under its own module name. Every round times one call of each, in turn (the
order alternating from round to round): ``_C.fused`` with its gradient (the unsharded path),
or with ``--sharded`` ``row_stats``, the statistics' merge and ``kl_grad`` on one shard
(``--no-grad``: without the gradient); for the SFT-stage losses (modes ``cross_entropy`` and
``reverse_kl``) their fused call, or their statistics, merge and gradient pass. Prints, per
mode, each build's median and the median and range of the per-round ratios AFTER / BEFORE, and
the largest difference between the two builds' KLs (or losses; 0 when a change only reorders
work); writes JSON with the device description and each build's commit.
"""
import argparse
import importlib.util
import statistics
import subprocess
import time
from pathlib import Path

import torch

from bench_anchored_kl import RESULTS, device_description, random_logits, write_results
from nemo_anchored.ops.anchored_kl import Interpolation
from nemo_anchored.ops.vocab_parallel import combine_softmax_stats, combine_softmax_stats_and_mean

WARMUP_ROUNDS = 2
ALPHA = 0.5
SFT_LOSSES = ("cross_entropy", "reverse_kl")


def load_build(checkout: Path, name: str):
    """The extension module built in ``checkout``, loaded as ``name``._C."""
    built = sorted((checkout / "nemo_anchored").glob("_C*.so"))
    if not built:
        raise SystemExit(f"{checkout}: no nemo_anchored/_C*.so (build it there first)")
    spec = importlib.util.spec_from_file_location(f"{name}._C", built[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def describe(checkout: Path) -> str:
    """The checkout's commit (``git describe --always --dirty``), or its path outside git."""
    done = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else str(checkout)


def unweighted(kernel, *args):
    """kernel(*args) with no per-row weights: the kernels' last argument, which the builds from
    before they took weights lack (pybind11 then raises TypeError)."""
    try:
        return kernel(*args, None)
    except TypeError:
        return kernel(*args)


def kernel_call(module, z, c, r, mode: int, sharded: bool, need_grad: bool):
    """One call of the build's kernels; returns the per-row KL."""
    if not sharded:
        kl, _ = unweighted(module.fused, z, c, r, ALPHA, 1.0, mode, need_grad)
        return kl
    lse = combine_softmax_stats(unweighted(module.row_stats, z, c, r, ALPHA, 1.0, mode), None)
    kl, _ = unweighted(module.kl_grad, z, c, r, lse, ALPHA, 1.0, mode, need_grad)
    return kl


def sft_kernel_call(module, z, r, labels, loss: str, sharded: bool, need_grad: bool):
    """One call of the build's SFT-stage kernels; returns the per-row loss (the merged
    statistics for the sharded cross-entropy, whose loss is formed in Python)."""
    if not sharded:
        if loss == "cross_entropy":
            return unweighted(module.cross_entropy_fused, z, labels, need_grad)[0]
        return unweighted(module.reverse_kl_fused, z, r, need_grad)[0]
    if loss == "cross_entropy":
        lse = combine_softmax_stats(unweighted(module.loss_stats, z, None)[0], None)
        if need_grad:
            unweighted(module.cross_entropy_grad, z, labels, lse)
        return lse
    stats, weighted = unweighted(module.loss_stats, z, r)
    lse, mean = combine_softmax_stats_and_mean(stats, weighted, None)
    return unweighted(module.reverse_kl_grad, z, r, lse, mean, need_grad)[0]


def compare_mode(builds, rows, cols, mode_name, dtype, sharded, need_grad, rounds) -> dict:
    if mode_name in SFT_LOSSES:
        z, r, _ = random_logits(rows, cols, "live", dtype, "cpu")
        labels = torch.randint(0, cols, (rows,), generator=torch.Generator().manual_seed(0))

        def call(module):
            return sft_kernel_call(module, z, r, labels, mode_name, sharded, need_grad)
    else:
        interpolation, anchor = mode_name.split("-")
        mode = int(Interpolation[interpolation.upper()])
        z, r, c = random_logits(rows, cols, anchor, dtype, "cpu")

        def call(module):
            return kernel_call(module, z, c, r, mode, sharded, need_grad)
    times = {name: [] for name in builds}
    kls = {}
    order = list(builds.items())
    for i in range(WARMUP_ROUNDS + rounds):
        for name, module in order if i % 2 == 0 else order[::-1]:  # neither always goes first
            start = time.perf_counter()
            kls[name] = call(module)
            if i >= WARMUP_ROUNDS:
                times[name].append(time.perf_counter() - start)
    ratios = sorted(a / b for b, a in zip(times["before"], times["after"]))
    return {"mode": mode_name,
            "median_s": {name: statistics.median(t) for name, t in times.items()},
            "after_over_before": {"median": statistics.median(ratios), "min": ratios[0],
                                  "max": ratios[-1]},
            "max_kl_difference": float((kls["after"] - kls["before"]).abs().max())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=32000, help="V (of the shard, --sharded)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--modes", nargs="+", default=["logit-live", "prob-snapshot"],
                        help="INTERPOLATION-ANCHOR (alpha 0.5), or an SFT-stage loss: "
                        f"{', '.join(SFT_LOSSES)}")
    parser.add_argument("--sharded", action="store_true",
                        help="the sharded passes (row_stats, merge, kl_grad) instead of fused")
    parser.add_argument("--no-grad", action="store_true", help="calls without the gradient")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    args = parser.parse_args()
    builds = {"before": load_build(args.before, "before"),
              "after": load_build(args.after, "after")}
    kernels = ("row_stats + kl_grad" if args.sharded else "fused") + (
        ", no gradient" if args.no_grad else ", with the gradient")
    print(f"{kernels}, {args.rows} x {args.cols} {args.dtype}, {torch.get_num_threads()} "
          f"threads, {args.rounds} rounds after {WARMUP_ROUNDS}")
    results = []
    for mode in args.modes:
        record = compare_mode(builds, args.rows, args.cols, mode, getattr(torch, args.dtype),
                              args.sharded, not args.no_grad, args.rounds)
        ratio = record["after_over_before"]
        print(f"{mode}: before {record['median_s']['before'] * 1e3:.1f} ms, after "
              f"{record['median_s']['after'] * 1e3:.1f} ms, after / before {ratio['median']:.3f} "
              f"({ratio['min']:.3f}-{ratio['max']:.3f}); KLs differ by at most "
              f"{record['max_kl_difference']:.3g}")
        results.append(record)
    name = (f"compare_builds_{'sharded' if args.sharded else 'fused'}_{args.rows}x{args.cols}_"
            f"{args.dtype}{'_no_grad' if args.no_grad else ''}.json")
    write_results(args.out or RESULTS / name,
                  {"device": device_description("cpu"), "kernels": kernels,
                   "before": describe(args.before), "after": describe(args.after),
                   "rows": args.rows, "cols": args.cols, "dtype": args.dtype,
                   "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
