"""Long-context training: peak memory and tokens/s per core attention, packing and recomputation.

    python bench/bench_long_context.py                    # GPU: SmolLM2-135M at 4096 tokens
    python bench/bench_long_context.py --seq 256 --layers 2 --micro-batch 2 --steps 3 --warmup 1
                                                          # CPU: a tiny run that proves it works

The model has SmolLM2-135M's shape (30 layers, hidden 576, 9 heads, 3 key/value groups, ffn
1536, vocabulary 49152, tied embeddings) with random weights. Each setting trains it on the
same synthetic examples, one forward and backward of the token cross-entropy per step (no
optimizer step: its state is the same for every setting), in a process of its own (a clean
peak-memory count):

- attention: ``sdpa`` (PyTorch's fused kernels) or ``local`` (megatron's DotProductAttention,
  which materialises the [b, heads, s, s] scores; the default without Transformer Engine
  before ``model.attention`` existed); ``model.attention``;
- packing: off (one example per row, padded to --seq) or on (examples placed into rows by
  first-fit decreasing, a block-diagonal causal mask, positions restarting per example);
- recompute: none, selective (the core attention) or full (every layer); ``model.recompute``.

Example lengths are drawn once (seeded): log-normal around --seq / 6, within [16, --seq], a
stand-in for chat data's long tail. Every step processes --micro-batch rows of --seq tokens;
tokens/s counts the examples' tokens (not the padding) per second of forward and backward,
median over the steps after --warmup. Peak memory: torch.cuda.max_memory_allocated on GPU; on
CPU the process's peak resident set, Python runtime included. Ratios are against local
attention, no packing, no recomputation.

Writes JSON with the device description to bench/results/.
"""
import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
from bench_anchored_kl import (RESULTS, device_description, resident_kib,  # noqa: E402
                               synchronize, write_results)

BASELINE = ("local", "off", "none")


def example_lengths(args) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    count = 4 * args.micro_batch * args.steps * 8  # enough for every step, packed or not
    lengths = torch.exp(math.log(args.seq / 6) + 0.6 * torch.randn(count, generator=g))
    return lengths.round().clamp(16, args.seq).long()


def rows(args, packing: bool):
    """Segment ids [rows, seq] (examples from 1, 0 on padding) of every row, in order."""
    from nemo_anchored.data.packing import first_fit_decreasing

    lengths = example_lengths(args)
    bins = first_fit_decreasing(lengths.numpy(), args.seq) if packing \
        else [[i] for i in range(len(lengths))]
    segments = torch.zeros(len(bins), args.seq, dtype=torch.long)
    for row, members in enumerate(bins):
        start = 0
        for number, item in enumerate(members, 1):
            length = int(lengths[item])
            segments[row, start:start + length] = number
            start += length
    return segments


def measure(args, attention: str, packing: str, recompute: str) -> dict:
    """Runs in its own process: one setting's tokens/s and peak memory."""
    from nemo_anchored.config import GPTConfig
    from nemo_anchored.data.packing import block_causal_mask, restarting_positions
    from nemo_anchored.models.gpt import build_gpt_model, mask_padded_vocab
    from nemo_anchored.ops import token_cross_entropy
    from nemo_anchored.parallel.distributed import init_model_parallel, shutdown

    context = init_model_parallel(1, 1, seed=0)
    device = context.device
    cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, num_query_groups=args.kv_heads,
                    ffn_hidden_size=args.ffn, vocab_size=args.vocab, max_seq_len=args.seq,
                    rotary_base=100000.0, dtype=args.dtype, attention=attention,
                    recompute=None if recompute == "none" else recompute)
    model = build_gpt_model(cfg).train()
    segments = rows(args, packing == "on")
    g = torch.Generator().manual_seed(1)
    times, tokens_per_step = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps):
        seg = segments[step * args.micro_batch:(step + 1) * args.micro_batch]
        tokens = torch.randint(0, args.vocab, seg.shape, generator=g).to(device)
        labels = torch.randint(0, args.vocab, seg.shape, generator=g).to(device)
        mask = (seg > 0).to(device, torch.float32)
        positions = restarting_positions(seg) if packing == "on" \
            else torch.arange(args.seq).expand_as(seg)
        attention_mask = block_causal_mask(seg).to(device) if packing == "on" else None
        synchronize(device.type)
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        logits = mask_padded_vocab(model(tokens, positions.to(device), attention_mask),
                                   args.vocab)
        loss = (token_cross_entropy(logits, labels) * mask).sum() / mask.sum()
        loss.backward()
        synchronize(device.type)
        times.append(time.perf_counter() - start)
        tokens_per_step.append(int(mask.sum()))
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resident_kib("VmHWM") / 1024
    shutdown()
    measured = slice(args.warmup, None)
    step_s = statistics.median(times[measured])
    return {"median_step_s": step_s, "step_times_s": times,
            "tokens_per_s": statistics.mean(tokens_per_step[measured]) / step_s,
            "padding_fraction": 1 - sum(tokens_per_step) / (len(times) * args.micro_batch
                                                             * args.seq),
            "peak_memory_mib": peak_mib, "loss": float(loss)}


def run_setting(args, setting) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--one", ",".join(setting)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        error = (result.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"{'/'.join(setting)} failed: {error}", file=sys.stderr)
        return {"error": error}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--ffn", type=int, default=1536)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--attention", default="sdpa,local")
    parser.add_argument("--packing", default="off,on")
    parser.add_argument("--recompute", default="none,selective,full")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # attention,packing,recompute
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    if args.one:
        print(json.dumps(measure(args, *args.one.split(","))))
        return

    settings = list(itertools.product(args.attention.split(","), args.packing.split(","),
                                      args.recompute.split(",")))
    results = {"/".join(s): run_setting(args, s) for s in settings}
    device = device_description("cuda" if on_gpu else "cpu")
    base = results.get("/".join(BASELINE), {})
    print(f"device: {device['name']} ({device['kind']}); model: {args.layers} layers x "
          f"{args.hidden} hidden, {args.heads} heads / {args.kv_heads} groups, vocab "
          f"{args.vocab}; {args.micro_batch} x {args.seq} tokens per step, {args.dtype}; median "
          f"over {args.steps - args.warmup} steps; ratios against {'/'.join(BASELINE)}")
    print(f"{'attention/packing/recompute':>28} | {'tokens/s':>9} {'x':>6} | {'peak MiB':>9} "
          f"{'x':>6} | padding")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:>28} | failed: {r['error'][:60]}")
            continue
        if "tokens_per_s" in base:
            r["tokens_ratio"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["memory_ratio"] = r["peak_memory_mib"] / base["peak_memory_mib"]
        print(f"{name:>28} | {r['tokens_per_s']:9.0f} {r.get('tokens_ratio', math.nan):5.2f}x | "
              f"{r['peak_memory_mib']:9.0f} {r.get('memory_ratio', math.nan):5.2f}x | "
              f"{r['padding_fraction']:.1%}")
    write_results(RESULTS / f"long_context_{device['kind']}_{args.dtype}_{args.seq}.json",
                  {"device": device, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
