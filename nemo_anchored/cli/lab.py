"""`nemo-anchored lab --out DIR [--quick|--demo|--full] [--seeds N]`: the forgetting lab
(nemo_anchored/lab/run.py), or with --pretrain-only the committed base it starts from. The same
command again continues an interrupted lab in DIR (nemo_anchored/lab/records.py)."""
import argparse
import dataclasses
import os
from pathlib import Path

from nemo_anchored.errors import UserError
from nemo_anchored.lab.base import REGENERATE
from nemo_anchored.lab.run import Lab, pretrain_only
from nemo_anchored.lab.settings import DEMO, FULL, QUICK


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", required=True, help="output directory (results.json, "
                        "pareto.png and .pdf, results.md, data/, runs/); a directory holding "
                        "an interrupted lab with the same settings is continued")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick CPU setting (default)")
    size.add_argument("--demo", action="store_true", help="the quick setting with fewer "
                      f"methods ({', '.join(DEMO.methods)}) and {DEMO.seeds} seeds (make demo)")
    size.add_argument("--full", action="store_true", help="a larger, longer setting")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default 3)")
    parser.add_argument("--base-checkpoint", default=None,
                        help="start from this p_base instead of the committed one or pretraining")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="pretrain p_base and write it, with checksums and settings, to "
                        f"--out (how assets/lab_base is made: `{REGENERATE}`)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's step checkpoints (the final weights are kept)")
    return parser


def run(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    settings = dataclasses.replace(FULL if args.full else DEMO if args.demo else QUICK)
    if args.seeds is not None:
        settings.seeds = args.seeds
    settings.keep_checkpoints = args.keep_checkpoints
    settings.base_checkpoint = args.base_checkpoint
    try:
        settings.check()
    except ValueError as error:  # settings that --seeds and friends made inconsistent
        raise UserError(str(error)) from None
    if args.pretrain_only:
        pretrain_only(Path(args.out), settings)
    else:
        Lab(Path(args.out), settings).run()
    return 0
