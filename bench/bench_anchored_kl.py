"""The anchored-KL operator against what a user would run instead: forward + backward time,
peak extra memory and the ratios, side by side in one run.

    python bench/bench_anchored_kl.py                  # CPU, fp32, the default shapes, TP 1 and 2
    python bench/bench_anchored_kl.py --device cuda --dtype bfloat16
    python bench/bench_anchored_kl.py --breakdown      # where ours spends its step (TP 1)

Implementations (``--backends``):
- ``eager``: the loss as the paper's authors compute it in their public KDFlow code
  (github.com/wutaiqiang/KDFlow, ``kdflow/loss/kl_div.py``: logits divided by the temperature,
  ``log_softmax`` and ``softmax`` in fp32, ``F.kl_div(log_p, q, reduction="none").sum(-1)``,
  autograd for the gradient), with the anchor formed from the detached current logits (the
  policy's in live mode, the snapshot's otherwise) and the reference; full vocabulary;
- ``compiled``: the same function under ``torch.compile`` (KDFlow compiles it too); compile
  time is left out (it happens in the warm-up steps);
- ``liger``: Liger-Kernel's KL divergence and JSD (beta = 0, forward KL) on torch's
  log-softmax, at alpha = 1 only (KL(p_ref || p_theta), the case they compute); GPU only,
  reported as not available otherwise;
- ``fused``: ours (nemo_anchored._C); ``torch``: our float64-capable reference backend.

Every step is a forward + backward of the mean over the tokens in the loss: all of them, or
with ``--kept F`` a random loss mask keeping about that share (fine-tuning data masks each
example's prompt and padding). The baselines take the mean's weights (mask / its sum) as the
gradient of their per-token loss; ours takes them in the forward (``anchored_kl(...,
weights=...)``, its documented use), which writes the gradient already weighted and skips the
tokens of weight 0, so its backward, given 1 per token by the sum, has nothing to do.

``--tp 2`` (CPU) runs each implementation in 2 gloo processes of 1 thread, each holding half
of the vocabulary: ours on the shards (its all-gather of the softmax statistics and
all-reduce of the KL included), eager and compiled on the full vocabulary gathered from the
shards on every rank (the all-gather of the inputs is counted in their time, the gradient is
the rank's slice of the full one).

Each (implementation, shape, mode) runs in fresh processes so its peak memory is its own: on
the CPU the rise of the peak resident set (VmHWM) over the resident inputs (the largest over
the ranks), on the GPU torch.cuda.max_memory_allocated over the inputs. Times are medians of
--repeats steps after WARMUP_STEPS; on the CPU the process's CPU time per step is recorded too,
which a loaded machine inflates less than the wall time. The effective bandwidth counts the
bytes the operator must move: each input shard read once and the gradient written once (at
TP > 1 the share is also given counting two reads of each input shard, the sharded passes'
floor). The copy bandwidth it is compared with (a large copy, bytes read + written, on the
same threads) is measured in the same process as ours, one copy after each timed step, so
both see the same machine load.

Writes JSON (with the device description) to bench/results/.
"""
import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nemo_anchored.host import cpu_model

RESULTS = Path(__file__).parent / "results"
# Untimed steps first: compilation, the one-off shard check, allocator growth, and on Linux the
# kernel's first compactions for huge pages (ours asks for them for its gradient: its first 2-3
# steps took up to 2x the later ones).
WARMUP_STEPS = 3
DEFAULT_SHAPES = ["4096x32000", "2048x19008"]  # 19008 = Qwen2.5's 152064 vocabulary / TP 8
BACKENDS = ["eager", "compiled", "liger", "fused", "torch"]
# MODE = interpolation-anchor-alpha; Liger computes only alpha = 1 (q = p_ref).
DEFAULT_MODES = {"cpu": ["logit-live-0.5", "prob-snapshot-0.5"],
                 "cuda": ["logit-live-0.5", "prob-snapshot-0.5", "logit-live-1"]}


def device_description(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(kind="gpu", name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        info.update(kind="cpu", name=cpu_model(), cores=os.cpu_count(),
                    load_average=list(os.getloadavg()))
    return info


def write_results(path: Path, record: dict) -> None:
    """``record`` (with its "device") as JSON at ``path`` (under bench/results/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    print(f"wrote {path}")


def resident_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------
# The baselines (our own code, following KDFlow's formula).


def eager_anchored_kl(z, r, c, alpha: float, interpolation: str, temperature: float = 1.0):
    """Per-token KL(q || p_theta) over the full vocabulary, KDFlow's way; c None: live."""
    z = z / temperature
    r = r / temperature
    current = (z if c is None else c / temperature).detach()
    log_p = torch.log_softmax(z, -1, dtype=torch.float32)
    if interpolation == "logit":
        anchor = r if alpha == 1.0 else (1 - alpha) * current + alpha * r
        q = torch.softmax(anchor, -1, dtype=torch.float32)
    else:
        q = ((1 - alpha) * torch.softmax(current, -1, dtype=torch.float32)
             + alpha * torch.softmax(r, -1, dtype=torch.float32))
    return F.kl_div(log_p, q, reduction="none").sum(-1)


def liger_losses():
    """{name: loss(z, r) -> scalar mean over tokens of KL(p_ref || p_theta)}, or None when
    Liger-Kernel cannot run here (it is Triton: CUDA only)."""
    if not torch.cuda.is_available():
        return None
    try:
        from liger_kernel.transformers import LigerJSD, LigerKLDIVLoss
    except ImportError:
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    jsd = LigerJSD(beta=0.0)  # beta = 0: forward KL(P || Q), P the teacher (second argument)

    def log_probs(x):
        return torch.log_softmax(x.float(), -1)

    return {"liger_kl": lambda z, r: kl(log_probs(z), log_probs(r)),
            "liger_jsd": lambda z, r: jsd(log_probs(z), log_probs(r))}


def loss_function(backend, interpolation, alpha, tp_group):
    """f(z, r, c) -> the per-token loss (or Liger's scalar mean) for one implementation; ours
    also takes ``weights``."""
    if backend in ("fused", "torch"):
        from nemo_anchored.ops import anchored_kl
        return lambda z, r, c, weights=None: anchored_kl(
            z, r, current_logits=c, alpha=alpha, interpolation=interpolation,
            tp_group=tp_group, backend=backend, weights=weights)
    if backend == "eager":
        return lambda z, r, c: eager_anchored_kl(z, r, c, alpha, interpolation)
    if backend == "compiled":
        compiled = torch.compile(eager_anchored_kl, dynamic=False)
        return lambda z, r, c: compiled(z, r, c, alpha, interpolation)
    raise ValueError(backend)


# --------------------------------------------------------------------------------------------
# One configuration, in its own process (or processes, at TP > 1).


def gather_columns(shard, group):
    """The full-vocabulary tensor from every rank's column shard (all-gather + concat)."""
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def random_logits(rows, cols, anchor, dtype, device, tp=1, rank=0):
    """z, r and c (None in live mode), drawn from seed 0 in that order: every rank draws the
    full tensors and keeps its own columns."""
    g = torch.Generator(device=device).manual_seed(0)
    width = cols // tp

    def make():
        full = (torch.randn(rows, cols, generator=g, device=device) * 3).to(dtype)
        return full[:, rank * width:(rank + 1) * width].contiguous()

    z, r = make(), make()
    return z, r, make() if anchor == "snapshot" else None


def make_step(backend, interpolation, alpha, z, r, c, weights, tp_group):
    """A forward + backward of one implementation; the policy's gradient lands in z.grad."""
    if backend.startswith("liger"):
        loss = liger_losses()[backend]

        def liger_step():
            z.grad = None
            loss(z, r).backward()
        return liger_step
    f = loss_function(backend, interpolation, alpha, tp_group)
    if backend in ("fused", "torch"):
        def ours_step():
            z.grad = None
            f(z, r, c, weights).sum().backward()
        return ours_step

    def gathered(x):  # the baselines see the full vocabulary on every rank
        return x if tp_group is None or x is None else gather_columns(x, tp_group)
    return baseline_step(z, lambda policy: f(policy, gathered(r), gathered(c)), weights,
                         tp_group)


def baseline_step(z, loss, weights, tp_group):
    """A baseline's forward + backward, the policy's gradient landing in z.grad: ``loss(policy)``
    is its per-token loss on the full vocabulary, given the mean's ``weights`` as its gradient.
    At TP > 1 the policy is gathered from the shards on every rank (the gather in the step's
    time) and the rank keeps its slice of the full gradient."""
    if tp_group is None:
        def step():
            z.grad = None
            loss(z).backward(weights)
        return step

    rank = torch.distributed.get_rank(tp_group)
    width = z.shape[-1]

    def gathered_step():
        z_full = gather_columns(z.detach(), tp_group).requires_grad_()
        loss(z_full).backward(weights)
        z.grad = z_full.grad[:, rank * width:(rank + 1) * width].contiguous()
    return gathered_step


def mean_weights(rows, kept, device):
    """Per-token weights of the mean over a loss mask keeping about ``kept`` of the tokens
    (seed 1; every token at 1)."""
    mask = torch.ones(rows)
    if kept < 1:
        mask = (torch.rand(rows, generator=torch.Generator().manual_seed(1)) < kept).float()
    return (mask / mask.sum()).to(device)


def measure_one(backend, rows, cols, mode, dtype, device, repeats, tp,
                kept=1.0) -> dict | None:
    """Time and peak memory of one configuration (on rank 0 at TP > 1; None elsewhere)."""
    interpolation, anchor, alpha = mode.split("-")
    tp_group = start_tensor_parallel(tp)
    rank = 0 if tp_group is None else torch.distributed.get_rank(tp_group)
    z, r, c = random_logits(rows, cols, anchor, dtype, device, tp, rank)
    z.requires_grad_()
    weights = mean_weights(rows, kept, device)
    step = make_step(backend, interpolation, float(alpha), z, r, c, weights, tp_group)
    # Ours is compared with a copy of as many bytes as it must move when every token is in the
    # loss (with fewer, it skips the others' inputs).
    record = time_steps(step, z, 3 if c is not None else 2, device, repeats, tp_group,
                        ours=backend == "fused", with_copy=backend == "fused" and kept == 1)
    if record is not None:
        record.update(backend=backend, rows=rows, cols=cols, tp=tp, mode=mode,
                      dtype=str(dtype), kept=kept)
    return record


def start_tensor_parallel(tp: int):
    """The gloo group of a TP > 1 configuration's processes (None at TP = 1)."""
    if tp == 1:
        return None
    torch.distributed.init_process_group("gloo")
    return torch.distributed.group.WORLD


def time_steps(step, z, streams: int, device, repeats, tp_group, *, ours: bool,
               with_copy: bool) -> dict | None:
    """Times ``step`` (which leaves the policy's gradient in z.grad) and the peak memory it
    adds: the record of measure_one (on rank 0 at TP > 1, whose process group it ends; None
    elsewhere). ``streams``: the [rows, V_local] inputs the operator reads; ``ours``: the step
    is the extension's (the gradient buffer it keeps between calls counts as its memory);
    ``with_copy``: compared with a copy of as many bytes as the operator must move (each input
    read once, the gradient written once), one after each step."""
    moved = (streams + 1) * z.numel() * z.element_size()
    copy_src = torch.ones(moved // 8 if with_copy else 0, device=device)
    copy_dst = torch.zeros_like(copy_src)

    for _ in range(WARMUP_STEPS):
        step()
    z.grad = None
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM from here on (Linux >= 4.0)
            f.write("5")
        base = resident_kib("VmRSS") * 1024
        if ours:  # the gradient buffer ours keeps between calls is ours too
            from nemo_anchored import _C
            base -= _C.idle_cpu_gradient_bytes()
    times, cpu_times, copy_times = [], [], []
    for _ in range(repeats):
        if tp_group is not None:
            torch.distributed.barrier(tp_group)
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        if copy_src.numel():
            start = time.perf_counter()
            copy_dst.copy_(copy_src)
            synchronize(device)
            copy_times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resident_kib("VmHWM") * 1024) - base
    if tp_group is not None:  # the slowest rank's times, the largest peak
        stats = torch.tensor([times, cpu_times, copy_times or [0.0] * repeats],
                             dtype=torch.float64)
        torch.distributed.all_reduce(stats, torch.distributed.ReduceOp.MAX)
        times, cpu_times, copy_times = stats.tolist()
        peak_t = torch.tensor([peak], dtype=torch.float64)
        torch.distributed.all_reduce(peak_t, torch.distributed.ReduceOp.MAX)
        peak = int(peak_t.item())
        rank = torch.distributed.get_rank(tp_group)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return None
    median = statistics.median(times)
    record = {"median_s": median, "times_s": times,
              "cpu_s_per_step": statistics.median(cpu_times), "peak_extra_bytes": peak,
              "bytes_moved_per_rank": moved, "effective_gb_per_s": moved / median / 1e9}
    if copy_src.numel():
        copy_gb_per_s = 2 * copy_src.numel() * 4 / statistics.median(copy_times) / 1e9
        record.update(copy_gb_per_s=copy_gb_per_s,
                      fraction_of_copy_bandwidth=record["effective_gb_per_s"] / copy_gb_per_s)
        if tp_group is not None:
            # The sharded passes must read every input twice, around the cross-rank merge
            # (vocab_parallel.py): the floor that design can reach, stated beside the other.
            twice = (2 * streams + 1) / (streams + 1)
            record["fraction_of_copy_bandwidth_reading_twice"] = (
                twice * record["fraction_of_copy_bandwidth"])
    return record


def breakdown_one(rows, cols, mode, dtype, device, repeats) -> dict:
    """Where ours spends a forward + backward (TP = 1): the whole step, the forward alone (its
    arithmetic and input reads, no gradient written), a read of the inputs (a sum of each: the
    floor of any pass over them) and the in-place rescaling of the gradient that a backward
    does for a call without weights (the step's call takes them and skips it)."""
    from nemo_anchored.ops.vocab_parallel import scale_rows_
    interpolation, anchor, alpha = mode.split("-")
    z, r, c = random_logits(rows, cols, anchor, dtype, device)
    inputs = [x for x in (z, r, c) if x is not None]
    policy = z.clone().requires_grad_()
    weights = mean_weights(rows, 1.0, device)
    loss = loss_function("fused", interpolation, float(alpha), None)

    def forward():
        with torch.no_grad():
            loss(z, r, c)

    def read():
        for x in inputs:
            x.sum()

    gradient = torch.randn_like(z)
    parts = {"step": make_step("fused", interpolation, float(alpha), policy, r, c, weights, None),
             "forward_no_grad": forward, "read_inputs": read,
             "rescale": lambda: scale_rows_(gradient, weights)}
    # The parts take turns, one call each per round, so that a change in the machine's load
    # (on a shared VM, the reads' speed varied 2x within minutes) reaches all of them alike.
    samples = {name: [] for name in parts}
    for i in range(WARMUP_STEPS + repeats):
        for name, fn in parts.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= WARMUP_STEPS:
                samples[name].append(time.perf_counter() - start)
    return {"shape": f"{rows}x{cols}", "mode": mode,
            "median_s": {name: statistics.median(t) for name, t in samples.items()}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_in_subprocess(args, backend, shape, mode, tp) -> dict | None:
    """One configuration in fresh processes; None when the implementation cannot run here."""
    if backend.startswith("liger") and (liger_losses() is None or tp > 1
                                        or not mode.startswith("logit-")
                                        or float(mode.split("-")[2]) != 1.0):
        return None
    rows, cols = map(int, shape.split("x"))
    return run_processes([sys.executable, __file__, "--one", backend, str(rows), str(cols), mode,
                          "--device", args.device, "--dtype", args.dtype, "--repeats",
                          str(args.repeats), "--tp", str(tp), "--kept", str(args.kept)],
                         tp, args.threads)


def run_processes(cmd: list, tp: int, threads: int) -> dict:
    """Runs a benchmark's ``--one`` command in a fresh process, or in ``tp`` gloo processes
    sharing ``threads``; returns the record rank 0 prints last."""
    if tp == 1:
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(tp), OMP_NUM_THREADS=str(max(1, threads // tp)))
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE,
                              text=True) for rank in range(tp)]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{' '.join(cmd[1:])}: failed at TP = {tp}")
    return json.loads(outs[0].strip().splitlines()[-1])


def implementations(backends):
    """The backends as measured: Liger is two (its KL divergence and its JSD)."""
    for backend in backends:
        yield from (["liger_kl", "liger_jsd"] if backend == "liger" else [backend])


# --------------------------------------------------------------------------------------------
# The table.


def compare(runs: dict) -> dict:
    """Ours against every baseline that ran: time and memory ratios (baseline / ours)."""
    ours = runs.get("fused")
    out = {}
    for name, run in runs.items():
        if name == "fused" or ours is None or run is None:
            continue
        out[name] = {"speedup": run["median_s"] / ours["median_s"],
                     "memory_ratio": run["peak_extra_bytes"] / max(ours["peak_extra_bytes"], 1)}
    return out


def print_row(shape, mode, tp, runs, ratios):
    cells = []
    for name, run in runs.items():
        if run is None:
            cells.append(f"{name} n/a")
            continue
        cell = f"{name} {run['median_s']:.3f}s {run['peak_extra_bytes'] / 2**20:.0f}MiB"
        if name in ratios:
            cell += (f" (ours {ratios[name]['speedup']:.2f}x faster, "
                     f"{ratios[name]['memory_ratio']:.2f}x less memory)")
        cells.append(cell)
    print(f"{shape} {mode} TP={tp}:\n    " + "\n    ".join(cells))
    ours = runs.get("fused")
    if ours and "fraction_of_copy_bandwidth" in ours:
        print(f"    ours: {ours['effective_gb_per_s']:.2f} GB/s per rank = "
              f"{ours['fraction_of_copy_bandwidth']:.0%} of the copy bandwidth measured "
              f"alongside ({ours['copy_gb_per_s']:.2f} GB/s, read + write); "
              f"CPU time {ours['cpu_s_per_step']:.3f} s per step")
        if "fraction_of_copy_bandwidth_reading_twice" in ours:
            print(f"    ours: {ours['fraction_of_copy_bandwidth_reading_twice']:.0%} of it "
                  "counting the two reads of each input shard that the sharded passes need")


def run_comparison(args, variants, key: str, names, run, prefix: str) -> None:
    """The comparison, printed and written as JSON (RESULTS/PREFIX_KIND_DTYPE[_tpN][_keptK].json
    unless ``args.out``): for every TP size (``args.tp``; default 1 and, on the CPU, 2), shape
    (``args.shapes``, ``args.tp_shapes`` at TP > 1) and variant (``key``: an anchored mode or an
    SFT-stage loss), each implementation in ``names`` by ``run(name, shape, variant, tp)``
    (None: cannot run here), ours against the others."""
    device = device_description(args.device)
    tps = args.tp or ([1, 2] if args.device == "cpu" else [1])
    if args.device != "cpu" and tps != [1]:
        raise SystemExit("--tp > 1 runs on the CPU only (gloo processes)")
    print(f"device: {device['name']} ({device['kind']}, {device['threads']} threads), "
          f"dtype {args.dtype}, median of {args.repeats}; times forward + backward of the mean "
          f"over {args.kept:.0%} of the tokens")
    rows_out = []
    for tp in tps:
        for shape in (args.shapes if tp == 1 else args.tp_shapes):
            for variant in variants:
                runs = {name: run(name, shape, variant, tp) for name in names}
                ratios = compare(runs)
                print_row(shape, variant, tp, runs, ratios)
                rows_out.append({"shape": shape, key: variant, "tp": tp, "runs": runs,
                                 "ours_vs": ratios, "load_average": list(os.getloadavg())})
    print("MiB: peak memory over the resident inputs during forward + backward (the "
          "gradient buffer alone is rows x V_local x itemsize); n/a: cannot run here")
    suffix = "" if tps == [1] else "_tp" + "".join(map(str, tps))
    if args.kept < 1:
        suffix += f"_kept{round(100 * args.kept)}"
    write_results(args.out or RESULTS / f"{prefix}_{device['kind']}_{args.dtype}{suffix}.json",
                  {"device": device, "dtype": args.dtype, "repeats": args.repeats,
                   "kept": args.kept, "results": rows_out})


def comparison_parser(description: str, backends) -> argparse.ArgumentParser:
    """The options an operator comparison takes (run_comparison's and time_steps')."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="ROWSxV (full)")
    parser.add_argument("--backends", nargs="+", default=backends, choices=backends)
    parser.add_argument("--tp", nargs="+", type=int, default=None,
                        help="tensor-parallel sizes (default: 1 and, on the CPU, 2)")
    parser.add_argument("--tp-shapes", nargs="+", default=DEFAULT_SHAPES[:1],
                        help="the shapes run at TP > 1")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kept", type=float, default=1.0,
                        help="the share of tokens a random loss mask keeps in the mean")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    return parser


def main():
    parser = comparison_parser(__doc__.splitlines()[0], BACKENDS)
    parser.add_argument("--modes", nargs="+", default=None,
                        help="INTERPOLATION-ANCHOR-ALPHA, e.g. logit-live-0.5 prob-snapshot-1")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the comparison: where ours spends its step (TP = 1)")
    parser.add_argument("--one", nargs=4, metavar=("BACKEND", "ROWS", "COLS", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    args.threads = torch.get_num_threads()

    if args.one:
        backend, rows, cols, mode = args.one
        tp = args.tp[0] if args.tp else 1
        record = measure_one(backend, int(rows), int(cols), mode, dtype, args.device,
                             args.repeats, tp, args.kept)
        if record is not None:
            print(json.dumps(record))
        return

    modes = args.modes or DEFAULT_MODES["cuda" if args.device == "cuda" else "cpu"]
    if args.breakdown:
        device = device_description(args.device)
        rows_out = []
        for shape in args.shapes:
            for mode in modes:
                record = breakdown_one(*map(int, shape.split("x")), mode, dtype, args.device,
                                       args.repeats)
                step = record["median_s"]["step"]
                print(f"{shape} {mode}: " + ", ".join(
                    f"{name} {s * 1e3:.1f} ms ({s / step:.0%})"
                    for name, s in record["median_s"].items()))
                rows_out.append(record)
        write_results(args.out or RESULTS / f"anchored_kl_breakdown_{device['kind']}_"
                      f"{args.dtype}.json", {"device": device, "dtype": args.dtype,
                                              "repeats": args.repeats, "results": rows_out})
        return
    run_comparison(args, modes, "mode", list(implementations(args.backends)),
                   lambda name, shape, mode, tp: run_in_subprocess(args, name, shape, mode, tp),
                   "anchored_kl")


if __name__ == "__main__":
    main()
