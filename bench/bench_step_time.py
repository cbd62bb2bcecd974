"""Step time and peak memory of Anchored Learning (live, snapshot) and KL-SFT against SFT, as
ratios; and of the SFT-stage losses' fused kernels against their torch path (sft, kl_sft).

    python bench/bench_step_time.py                      # CPU defaults: a small GPT, vocab 32000
    python bench/bench_step_time.py --hidden 2048 --layers 16 --vocab 152064 --seq 2048

Each method trains the same model on the same batches through the real command line
(`python -m nemo_anchored ...`, one process), from the same base and reference. Step times are
the medians of the logged `step_time_s` after --warmup steps; peak memory is the run's logged
`peak_memory_mib` (GPU: torch.cuda.max_memory_allocated; CPU: the process's peak resident set,
which includes the Python runtime). Goal on GPU: live <= 1.35x and snapshot <= 1.7x of SFT.
SFT and KL-SFT run twice: with the loss kernels chosen as in production (`baselines.backend=auto`:
the fused kernels when built) and with `baselines.backend=torch`; "x SFT" is against the former.

Writes JSON with the device description to bench/results/.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_anchored_kl import RESULTS, device_description, write_results  # noqa: E402

RECIPE = ROOT / "recipes/tiny_cpu.yaml"  # its model and batch give way to run_overrides
TORCH_PATH = ["baselines.backend=torch"]
METHODS = {"sft": ("sft", []),
           "sft_torch": ("sft", TORCH_PATH),
           "kl_sft": ("sft", ["method=kl_sft"]),
           "kl_sft_torch": ("sft", ["method=kl_sft", *TORCH_PATH]),
           "anchored_live": ("anchor", ["anchor.mode=live"]),
           "anchored_snapshot": ("anchor", ["anchor.mode=snapshot"])}


def train(command, overrides, run_dir):
    cmd = [sys.executable, "-m", "nemo_anchored", command, "--config", str(RECIPE), *overrides,
           f"logging.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text()
            .splitlines() if '"event"' not in line]


def run_overrides(args) -> tuple[list[str], list[str]]:
    """The recipe overrides of every run: (the model, batch and logging; the timed steps)."""
    model = [f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}",
             f"model.num_attention_heads={args.heads}", f"model.num_query_groups={args.heads}",
             f"model.ffn_hidden_size={4 * args.hidden}", f"model.vocab_size={args.vocab}",
             f"model.max_seq_len={args.seq}", f"data.seq_length={args.seq}",
             f"model.dtype={args.dtype}", f"trainer.device={args.device}",
             f"trainer.micro_batch_size={args.micro_batch}",
             f"trainer.global_batch_size={2 * args.micro_batch}",
             "logging.progress=false", "logging.tensorboard=false", "checkpoint.resume=none",
             f"logging.diagnostics_every={args.diagnostics_every}"]
    steps = [f"trainer.max_steps={args.steps}", "anchor.outer_iterations=1",
             f"anchor.inner_steps={args.steps}"]
    return model, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="JSON path (default: bench/results/"
                        "step_time_<device kind>_<dtype>[_diagnostics<N>].json)")
    # 0: the loss path alone (the recorded ratios); 1: the recipes' default, the trust-region
    # diagnostic and KL to the reference every step.
    parser.add_argument("--diagnostics-every", type=int, default=0)
    args = parser.parse_args()

    model, steps = run_overrides(args)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train("sft", [*model, "trainer.max_steps=1"], tmp / "reference")  # base + reference
        start = [f"model.base_checkpoint={tmp / 'reference/base'}",
                 f"model.reference_checkpoint={tmp / 'reference/final'}"]
        results = {}
        for name, (command, extra) in METHODS.items():
            records = train(command, [*model, *steps, *start, *extra], tmp / name)
            times = [r["step_time_s"] for r in records[args.warmup:]]
            results[name] = {"median_step_s": statistics.median(times), "step_times_s": times,
                             "peak_memory_mib": max(r["peak_memory_mib"] for r in records)}

    device = device_description("cuda" if "cuda" in args.device else "cpu")
    sft = results["sft"]
    print(f"device: {device['name']} ({device['kind']}); model: {args.layers} layers x "
          f"{args.hidden} hidden, vocab {args.vocab}, {args.micro_batch} x {args.seq} tokens "
          f"per micro-batch, {args.dtype}; median over {args.steps - args.warmup} steps")
    print(f"{'method':>18} | {'step s':>8} {'x SFT':>6} | {'peak MiB':>9} {'x SFT':>6}")
    for name, r in results.items():
        r["time_ratio"] = r["median_step_s"] / sft["median_step_s"]
        r["memory_ratio"] = r["peak_memory_mib"] / sft["peak_memory_mib"]
        print(f"{name:>18} | {r['median_step_s']:8.4f} {r['time_ratio']:5.2f}x | "
              f"{r['peak_memory_mib']:9.0f} {r['memory_ratio']:5.2f}x")
    print(f"{'fused / torch path':>18} | {'step':>8} {'':>6} | {'peak':>9}")
    for name in ("sft", "kl_sft"):
        fused, plain = results[name], results[f"{name}_torch"]
        fused["fused_over_torch"] = {
            "time": fused["median_step_s"] / plain["median_step_s"],
            "memory": fused["peak_memory_mib"] / plain["peak_memory_mib"]}
        print(f"{name:>18} | {fused['fused_over_torch']['time']:7.2f}x {'':>6} | "
              f"{fused['fused_over_torch']['memory']:8.2f}x")
    suffix = f"_diagnostics{args.diagnostics_every}" if args.diagnostics_every else ""
    write_results(Path(args.out) if args.out else
                  RESULTS / f"step_time_{device['kind']}_{args.dtype}{suffix}.json",
                  {"device": device, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
