"""`nemo-anchored eval`: benchmarks on a checkpoint or an exported model
(nemo_anchored/eval/benchmarks.py).

    nemo-anchored eval --checkpoint CKPT --config RUN_DIR/config.yaml --tasks mmlu,humaneval
        [--limit N] [--seed S] [--data TASK=FILE.jsonl ...] [--out results.json] [key=value ...]
    (--config: a run's config.yaml, a recipe, or the model.yaml of `convert hf-to-mcore`)
    nemo-anchored eval --hf HF_DIR --tasks ...   (an exported model, through transformers)
"""
import argparse
import json
import math
from pathlib import Path
from typing import Dict, List, Sequence

from nemo_anchored.atomic import write_text
from nemo_anchored.data.builders import TASKS as BUILT_TASKS
from nemo_anchored.errors import UserError
from nemo_anchored.eval.benchmarks import (DEFAULT_GENERATED_N, DEFAULT_MAX_NEW_TOKENS, TASKS,
                                           EvalSettings, evaluate_checkpoint, evaluate_hf)
from nemo_anchored.eval.loaders import load_task_examples
from nemo_anchored.eval.scoring import HUMANEVAL_TIMEOUT_S


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--checkpoint", help="checkpoint directory (its policy weights are "
                        "evaluated through megatron-core), e.g. RUN_DIR/final; needs --config")
    parser.add_argument("--config", help="the run's config.yaml, a recipe or a conversion's "
                        "model.yaml (model architecture and data.tokenizer)")
    parser.add_argument("--hf", help="instead of --checkpoint/--config: a Hugging Face model "
                        "folder (`nemo-anchored convert mcore-to-hf`), run with transformers")
    parser.add_argument("--tasks", required=True,
                        help=f"comma-separated, from: {', '.join(TASKS)}")
    parser.add_argument("--limit", type=int, default=None, help="examples per task "
                        f"(deterministic sample; built tasks without --data: default "
                        f"{DEFAULT_GENERATED_N})")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, and the seed of "
                        "built tasks generated here")
    parser.add_argument("--data", action="append", default=[], metavar="TASK=FILE.jsonl",
                        help="a built task's held-out examples (the --test-out of `nemo-anchored "
                        "data build`); repeatable")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="generation budget (default per task: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_MAX_NEW_TOKENS.items()) + ")")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per forward")
    parser.add_argument("--timeout", type=float, default=HUMANEVAL_TIMEOUT_S,
                        help="seconds per HumanEval program")
    parser.add_argument("--out", default=None, help="results JSON (scores, per-example "
                        "records, settings)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of --config, e.g. data.tokenizer=DIR")
    return parser


def _parse_tasks(text: str) -> List[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise UserError(f"--tasks: {', '.join(unknown) or 'none given'}; expected some of "
                        f"{', '.join(TASKS)}")
    return list(dict.fromkeys(tasks))


def _parse_data(items: Sequence[str]) -> Dict[str, str]:
    data = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or task not in BUILT_TASKS or not path:
            raise UserError(f"--data {item!r}: expected TASK=FILE.jsonl with TASK one of "
                            f"{', '.join(BUILT_TASKS)}")
        data[task] = path
    return data


def run(args) -> int:
    """Run `nemo-anchored eval`; returns the exit status. Bad arguments, config, data or
    checkpoint raise UserError."""
    tasks = _parse_tasks(args.tasks)
    settings = EvalSettings(limit=args.limit, seed=args.seed, data=_parse_data(args.data),
                            max_new_tokens=args.max_new_tokens, timeout=args.timeout)
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    if args.batch_size < 1:
        raise UserError("--batch-size must be >= 1")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be >= 1")
    if not 0 < args.timeout < math.inf:
        raise UserError("--timeout must be > 0 seconds and finite")
    for task, path in settings.data.items():
        if task not in tasks:
            raise UserError(f"--data {task}={path}: {task} is not in --tasks")
        load_task_examples(task, path)  # fail before the model is built
    if bool(args.hf) == bool(args.checkpoint or args.config):
        raise UserError("give either --hf DIR or --checkpoint CKPT --config CONFIG")
    if args.hf and not Path(args.hf, "config.json").is_file():
        raise UserError(f"--hf {args.hf}: no config.json (not a Hugging Face model folder)")
    if not args.hf and not (args.checkpoint and args.config):
        raise UserError("--checkpoint and --config go together")
    if args.hf and args.overrides:
        raise UserError(f"{args.overrides[0]}: key=value overrides apply to --config, not --hf")
    if args.hf:
        results = evaluate_hf(args.hf, tasks, settings, batch_size=args.batch_size)
    else:
        results = evaluate_checkpoint(args.checkpoint, args.config, tasks, settings,
                                      overrides=args.overrides, batch_size=args.batch_size)
    if args.out:
        out = write_text(args.out, json.dumps(results, indent=1))
        print(f"nemo-anchored eval: results -> {out}")
    return 0
