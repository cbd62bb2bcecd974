"""Fused vs torch backend of anchored_kl: forward + backward time and peak memory, side by side.

    python bench/bench_anchored_kl.py                  # CPU, fp32, the default shapes
    python bench/bench_anchored_kl.py --device cuda --dtype bfloat16

Each (backend, shape, mode) runs in a fresh subprocess so its peak memory is its own: on the
CPU the rise of the process's peak resident set (VmHWM) over the resident inputs, on the GPU
torch.cuda.max_memory_allocated over the inputs. Times are medians of --repeats runs after a
warm-up. The effective bandwidth counts the bytes the operator must move: each input shard
read once and the gradient written once. On a GPU the device's copy bandwidth (a large
device-to-device copy, bytes read + written) is measured too, for the ratio.

Writes JSON (with the device description) to bench/results/.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
DEFAULT_SHAPES = ["4096x32000", "2048x19008"]  # 19008 = Qwen2.5's 152064 vocabulary / TP 8


def device_description(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(kind="gpu", name=props.name, memory_gib=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
    else:
        model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), platform.processor())
        info.update(kind="cpu", name=model, cores=os.cpu_count())
    return info


def write_results(path: Path, record: dict) -> None:
    """``record`` (with its "device") as JSON at ``path`` (under bench/results/)."""
    path.parent.mkdir(exist_ok=True)
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


def measure_one(backend, rows, cols, mode, dtype, device, repeats) -> dict:
    """Runs in its own process: time and peak memory of one configuration."""
    from nemo_anchored.ops import anchored_kl

    interpolation, anchor = mode.split("-")
    g = torch.Generator(device=device).manual_seed(0)

    def make():
        return (torch.randn(rows, cols, generator=g, device=device) * 3).to(dtype)

    z, r = make().requires_grad_(), make()
    c = make() if anchor == "snapshot" else None
    weights = torch.full((rows,), 1.0 / rows, device=device)

    def step():
        z.grad = None
        loss = anchored_kl(z, r, current_logits=c, alpha=0.5, interpolation=interpolation,
                           backend=backend)
        loss.backward(weights)

    step()  # warm-up (and the one-off shard check, allocator growth)
    z.grad = None
    synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_kib("VmRSS") * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resident_kib("VmHWM") * 1024) - base
    streams = 3 if c is not None else 2
    moved = (streams + 1) * rows * cols * z.element_size()
    median = statistics.median(times)
    return {"backend": backend, "rows": rows, "cols": cols, "mode": mode, "dtype": str(dtype),
            "median_s": median, "times_s": times, "peak_extra_bytes": peak,
            "bytes_moved": moved, "effective_gb_per_s": moved / median / 1e9}


def copy_bandwidth_gb_per_s(device) -> float:
    """Device-to-device copy of 2 GiB, bytes read + written, median of 20."""
    src = torch.empty(2**29, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(21):
        synchronize(device)
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / statistics.median(times[1:]) / 1e9


def run_in_subprocess(args, backend, shape, mode) -> dict:
    rows, cols = map(int, shape.split("x"))
    cmd = [sys.executable, __file__, "--one", backend, str(rows), str(cols), mode,
           "--device", args.device, "--dtype", args.dtype, "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="ROWSxV_LOCAL")
    parser.add_argument("--modes", nargs="+", default=["logit-live", "prob-snapshot"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: results/)")
    parser.add_argument("--one", nargs=4, metavar=("BACKEND", "ROWS", "COLS", "MODE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)

    if args.one:
        backend, rows, cols, mode = args.one
        print(json.dumps(measure_one(backend, int(rows), int(cols), mode, dtype, args.device,
                                     args.repeats)))
        return

    device = device_description(args.device)
    copy_bw = copy_bandwidth_gb_per_s(args.device) if args.device == "cuda" else None
    rows_out = []
    print(f"device: {device['name']} ({device['kind']}, {device['threads']} threads), "
          f"dtype {args.dtype}, median of {args.repeats}")
    if copy_bw:
        print(f"measured copy bandwidth: {copy_bw:.0f} GB/s (read + write)")
    header = (f"{'shape':>12} {'mode':>14} | {'torch s':>8} {'fused s':>8} {'speedup':>7} | "
              f"{'torch MiB':>9} {'fused MiB':>9} {'mem ratio':>9} | {'fused GB/s':>10}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        for mode in args.modes:
            torch_run = run_in_subprocess(args, "torch", shape, mode)
            fused_run = run_in_subprocess(args, "fused", shape, mode)
            speedup = torch_run["median_s"] / fused_run["median_s"]
            mem_ratio = torch_run["peak_extra_bytes"] / max(fused_run["peak_extra_bytes"], 1)
            line = (f"{shape:>12} {mode:>14} | {torch_run['median_s']:8.3f} "
                    f"{fused_run['median_s']:8.3f} {speedup:6.2f}x | "
                    f"{torch_run['peak_extra_bytes'] / 2**20:9.0f} "
                    f"{fused_run['peak_extra_bytes'] / 2**20:9.0f} {mem_ratio:8.2f}x | "
                    f"{fused_run['effective_gb_per_s']:10.1f}")
            if copy_bw:
                line += f" ({fused_run['effective_gb_per_s'] / copy_bw:.0%} of copy)"
            print(line)
            grad_mib = int(shape.split("x")[0]) * int(shape.split("x")[1]) * \
                dtype.itemsize / 2**20
            rows_out.append({"shape": shape, "mode": mode, "torch": torch_run,
                             "fused": fused_run, "speedup": speedup, "memory_ratio": mem_ratio,
                             "gradient_buffer_mib": grad_mib,
                             "fraction_of_copy_bandwidth": (
                                 fused_run["effective_gb_per_s"] / copy_bw if copy_bw else None)})
    print("peak MiB: extra memory over the resident inputs during forward + backward "
          "(the gradient buffer alone is rows x V_local x itemsize)")
    write_results(args.out or RESULTS / f"anchored_kl_{device['kind']}_{args.dtype}.json",
                  {"device": device, "dtype": args.dtype, "copy_bandwidth_gb_per_s": copy_bw,
                   "results": rows_out})


if __name__ == "__main__":
    main()
