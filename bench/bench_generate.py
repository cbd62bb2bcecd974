"""Greedy generation through megatron-core on prompts of mixed lengths: left-padded batches
against batches of equal-length prompts and one prompt at a time, as ratios.

    python bench/bench_generate.py                          # CPU defaults: a small GPT
    python bench/bench_generate.py --device cuda --dtype bfloat16 --layers 30 --hidden 576 \
        --heads 9 --groups 3 --vocab 49152 --min-prompt 32 --max-prompt 512 --new 256 \
        --prompts 256 --batch 64                            # SmolLM2-135M shape

All three run megatron's static KV cache (`nemo_anchored.eval.generate`): one forward over a
batch's prompts, then one single-token forward per new token.

- padded: `greedy_generate_ids`, prompts sorted by length, --batch at a time, left-padded with
  an attention mask (the path for a model whose attention applies a given mask);
- grouped: the same batches, but only among prompts of one length, no padding (the path before
  padding, and still the one for Transformer Engine's attention);
- one at a time: --batch 1.

Prompt lengths are drawn uniformly from [--min-prompt, --max-prompt] (seeded), on a
random-weight model, no stop token (every prompt gets exactly --new tokens). With
--full-forward, one prompt at a time without a cache (every new token a forward over the whole
sequence so far, the loop the KV cache replaced) is timed too. Times are medians of --repeats
synchronized wall-clock runs, the paths taking turns; each path's continuations are compared
with one-at-a-time's and the matches reported (padding moves a row's rotary positions, which
changes rounding only).

Writes JSON with the device description to bench/results/.
"""
import argparse
import random
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
def full_forward_greedy(model, prompt, new_tokens: int, vocab_size: int):
    """Every new token from a forward over the whole sequence (the loop the KV cache replaced)."""
    from nemo_anchored.models.gpt import mask_padded_vocab

    tokens = torch.tensor([prompt], device=next(model.parameters()).device)
    for _ in range(new_tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)[None]
        logits = model(tokens, positions, None)[:, -1, :].float()
        tokens = torch.cat([tokens, mask_padded_vocab(logits, vocab_size).argmax(-1)[:, None]], 1)
    return tokens[0, len(prompt):].tolist()


def grouped_greedy(model, prompts, new_tokens: int, vocab_size: int, batch_size: int):
    """Batches of equal-length prompts only (no padding)."""
    from nemo_anchored.eval.generate import generation_batches, greedy_batch

    outputs = [None] * len(prompts)
    for rows in generation_batches([len(p) for p in prompts], batch_size, pad=False):
        news = greedy_batch(model, [prompts[i] for i in rows], [new_tokens] * len(rows),
                            vocab_size=vocab_size, stop_ids=set())
        for i, new in zip(rows, news):
            outputs[i] = new
    return outputs


def timed(paths, device, repeats):
    """{name: (median seconds, result)}; the paths take turns within each repeat, so a change
    in the machine's load during the run falls on all of them alike."""
    times, results = {name: [] for name in paths}, {}
    for _ in range(repeats):
        for name, fn in paths.items():
            synchronize(device)
            start = time.perf_counter()
            results[name] = fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in paths}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--min-prompt", type=int, default=8, help="shortest prompt (tokens)")
    parser.add_argument("--max-prompt", type=int, default=96, help="longest prompt (tokens)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="generated tokens")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-forward", action="store_true",
                        help="also time one prompt at a time without the KV cache")
    parser.add_argument("--attention", default="auto", help="model.attention")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nemo_anchored.config import GPTConfig
    from nemo_anchored.eval.generate import (generation_batches, greedy_generate_ids,
                                             masks_padding)
    from nemo_anchored.models.gpt import build_gpt_model
    from nemo_anchored.parallel.distributed import model_parallel

    draw = random.Random(args.seed)
    lengths = [draw.randint(args.min_prompt, args.max_prompt) for _ in range(args.prompts)]
    prompts = [[draw.randrange(args.vocab) for _ in range(n)] for n in lengths]
    with model_parallel(1, 1, seed=args.seed):
        cfg = GPTConfig(num_layers=args.layers, hidden_size=args.hidden,
                        num_attention_heads=args.heads, num_query_groups=args.groups,
                        vocab_size=args.vocab, max_seq_len=args.max_prompt + args.new,
                        dtype=args.dtype, init_method_std=0.3, attention=args.attention)
        model = build_gpt_model(cfg).to(args.device).eval()
        padding = masks_padding(model)

        def kv(batch_size):
            return lambda: greedy_generate_ids(model, prompts, vocab_size=args.vocab,
                                               stop_ids=set(), max_new_tokens=args.new,
                                               batch_size=batch_size)

        paths = {"one_at_a_time": kv(1), "grouped": lambda: grouped_greedy(
            model, prompts, args.new, args.vocab, args.batch), "padded": kv(args.batch)}
        if args.full_forward:
            paths["full_forward"] = lambda: [full_forward_greedy(model, p, args.new, args.vocab)
                                             for p in prompts]
        timings = timed(paths, args.device, args.repeats)

    base_s, reference = timings["one_at_a_time"]
    padded_batches = generation_batches(lengths, args.batch, pad=True)
    pad_tokens = sum(max(lengths[i] for i in rows) - lengths[i]
                     for rows in padded_batches for i in rows)
    results = {name: {"seconds": s, "speedup_vs_one_at_a_time": base_s / s,
                      "identical_to_one_at_a_time": sum(g == w for g, w in zip(got, reference))}
               for name, (s, got) in timings.items()}
    results["padding_used"] = padding  # False: the attention ignores masks, "padded" is grouped
    results["batches"] = {"padded": len(padded_batches), "grouped": len(
        generation_batches(lengths, args.batch, pad=False))}
    results["pad_fraction_of_prompt_tokens"] = pad_tokens / (pad_tokens + sum(lengths))
    device = device_description(args.device)
    print(f"device: {device['name']} ({device['kind']}); {args.layers} layers x {args.hidden} "
          f"hidden, vocab {args.vocab}, {args.dtype}; {args.prompts} prompts of "
          f"{args.min_prompt}-{args.max_prompt} tokens, {args.new} new, batch {args.batch}; "
          f"median of {args.repeats}")
    if not padding:
        print(f"attention {args.attention!r} does not apply a given mask: 'padded' ran grouped")
    print(f"batches: padded {results['batches']['padded']}, grouped by length "
          f"{results['batches']['grouped']}; pads "
          f"{results['pad_fraction_of_prompt_tokens']:.1%} of the padded prompt tokens")
    for name, row in results.items():
        if name in timings:
            print(f"{name:>14}: {row['seconds']:8.3f} s | {row['speedup_vs_one_at_a_time']:5.2f}x "
                  f"one at a time | identical continuations "
                  f"{row['identical_to_one_at_a_time']}/{args.prompts}")
    write_results(RESULTS / f"generate_{device['kind']}_{args.dtype}.json",
                  {"device": device, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
