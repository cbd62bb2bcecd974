"""`nemo-anchored report RUNS_DIR --domain TASK`: the experiment's table from the eval_NAME.json
files in RUNS_DIR (nemo_anchored/eval/report.py), printed."""
import argparse
import sys
from pathlib import Path

from nemo_anchored.eval.report import load_scores, table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("folder", type=Path)
    parser.add_argument("--domain", required=True, help="the domain task's name")
    return parser


def run(args) -> int:
    try:
        print(table(load_scores(args.folder), args.domain))
    except FileNotFoundError as error:
        print(f"report: {error}", file=sys.stderr)
        return 2
    return 0
