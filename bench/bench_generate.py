"""Greedy generation through megatron-core: the KV-cached loop against full forwards, as a ratio.

    python bench/bench_generate.py                          # CPU defaults: a small GPT
    python bench/bench_generate.py --device cuda --dtype bfloat16 --layers 30 --hidden 576 \
        --heads 9 --groups 3 --vocab 49152 --prompt 128 --new 512 --batch 16   # SmolLM2-135M shape

`nemo_anchored.eval.generate.greedy_generate_ids` (megatron's static KV cache: one forward over
the prompts, then one single-token forward per new token) against the loop it replaced (every
new token a forward over the whole sequence so far), on the same random-weight model and
prompts, no stop token (both produce exactly --new tokens). Times are medians of --repeats
synchronized wall-clock runs; the continuations of both are compared and the match reported.

Writes JSON with the device description to bench/results/.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_anchored_kl import (RESULTS, device_description, synchronize,  # noqa: E402
                               write_results)


@torch.no_grad()
def full_forward_greedy(model, prompts: torch.Tensor, new_tokens: int, vocab_size: int):
    """Every new token from a forward over the whole sequence (the loop the KV cache replaced)."""
    from nemo_anchored.models.gpt import mask_padded_vocab

    tokens = prompts
    for _ in range(new_tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        logits = model(tokens, positions, None)[:, -1, :].float()
        tokens = torch.cat([tokens, mask_padded_vocab(logits, vocab_size).argmax(-1)[:, None]], 1)
    return tokens[:, prompts.shape[1]:].tolist()


def timed(fn, device, repeats):
    times, result = [], None
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="generated tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from nemo_anchored.eval.generate import greedy_generate_ids
    from nemo_anchored.config import GPTConfig
    from nemo_anchored.models.gpt import build_gpt_model
    from nemo_anchored.parallel.distributed import model_parallel

    with model_parallel(1, 1, seed=0):
        cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, num_query_groups=args.groups,
                        vocab_size=args.vocab, max_seq_len=args.prompt + args.new,
                        dtype=args.dtype, init_method_std=0.3)
        model = build_gpt_model(cfg).to(args.device).eval()
        prompts = torch.randint(0, args.vocab, (args.batch, args.prompt), device=args.device)
        full_s, want = timed(lambda: full_forward_greedy(model, prompts, args.new, args.vocab),
                             args.device, args.repeats)
        cached_s, got = timed(lambda: greedy_generate_ids(
            model, prompts.tolist(), vocab_size=args.vocab, stop_ids=set(),
            max_new_tokens=args.new, batch_size=args.batch), args.device, args.repeats)

    device = device_description(args.device)
    same = sum(g == w for g, w in zip(got, want))
    results = {"full_forward_s": full_s, "kv_cached_s": cached_s, "speedup": full_s / cached_s,
               "identical_continuations": same, "prompts": args.batch}
    print(f"device: {device['name']} ({device['kind']}); {args.layers} layers x {args.hidden} "
          f"hidden, vocab {args.vocab}, {args.dtype}; {args.batch} prompts x {args.prompt} "
          f"tokens, {args.new} new; median of {args.repeats}")
    print(f"full forwards {full_s:8.3f} s | KV-cached {cached_s:8.3f} s | "
          f"{results['speedup']:.2f}x | identical continuations {same}/{args.batch}")
    write_results(RESULTS / f"generate_{device['kind']}_{args.dtype}.json",
                  {"device": device, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
