"""`nemo-anchored report RUNS_DIR --domain TASK`: the experiment's table from the eval_NAME.json
files in RUNS_DIR (nemo_anchored/eval/report.py), printed."""
import argparse
from pathlib import Path

from nemo_anchored.errors import UserError
from nemo_anchored.eval.report import load_scores, table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("folder", type=Path)
    parser.add_argument("--domain", required=True, help="the domain task's name")
    return parser


def run(args) -> int:
    try:
        scores = load_scores(args.folder)
    except FileNotFoundError as error:  # a folder without eval files
        raise UserError(str(error)) from None
    print(table(scores, args.domain))
    return 0
