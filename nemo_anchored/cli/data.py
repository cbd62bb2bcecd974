"""`nemo-anchored data build TASK --n N --seed S --out FILE.jsonl [--test-n M --test-out FILE]`:
a task's chat-format training (and held-out) split from the offline builders
(nemo_anchored/data/builders.py)."""
import argparse
import sys
from pathlib import Path

from nemo_anchored.data.builders import TASKS, build_splits, write_jsonl


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`nemo-anchored data build TASK ...` on the `data` sub-command's parser."""
    commands = parser.add_subparsers(dest="data_command", required=True)
    build_parser = commands.add_parser("build", help="generate a task's train (and test) JSONL")
    build_parser.add_argument("task", choices=TASKS)
    build_parser.add_argument("--n", type=int, required=True, help="training examples")
    build_parser.add_argument("--seed", type=int, default=0)
    build_parser.add_argument("--out", required=True, help="training split JSONL")
    build_parser.add_argument("--test-n", type=int, default=0,
                              help="held-out examples, disjoint from the training split")
    build_parser.add_argument("--test-out", help="held-out split JSONL (needs --test-n)")
    return parser


def run(args) -> int:
    """Run `nemo-anchored data build`; returns the exit status (2: bad arguments)."""
    def fail(message: str) -> int:
        print(f"nemo-anchored data build: {message}", file=sys.stderr)
        return 2

    if args.n < 0 or args.test_n < 0:
        return fail("--n and --test-n must be >= 0")
    if bool(args.test_n) != bool(args.test_out):
        return fail("--test-n and --test-out go together")
    if args.test_out and Path(args.test_out).resolve() == Path(args.out).resolve():
        return fail("--test-out must differ from --out")
    train, test = build_splits(args.task, args.n, args.test_n, args.seed)
    write_jsonl(args.out, train)
    message = f"{args.task} (seed {args.seed}): {len(train)} training examples -> {args.out}"
    if args.test_out:
        write_jsonl(args.test_out, test)
        message += f"; {len(test)} held-out examples -> {args.test_out} (no shared question)"
    print(message)
    return 0
