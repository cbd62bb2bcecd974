"""nemo-anchored sft|anchor --config RECIPE.yaml [key=value ...] | lab --out DIR | convert ...

    sft     stage 1: plain SFT from the base (writes the reference: RUN_DIR/final), and the
            baselines through the same command (method=low_sft|kl_sft|dft|stm)
    anchor  stage 2: Anchored Learning toward model.reference_checkpoint
    launch  --executor local|slurm|sbatch --config RECIPE.yaml [--nodes N --gpus-per-node G ...]
            both stages as one job under torchrun: NeMo-Run or a plain sbatch script
    lab     the forgetting lab: domain gain against general-skill loss, every method
    convert hf-to-mcore --hf PATH --out DIR [--tp N --pp M] [--gguf-file NAME]
            a Hugging Face Llama/Qwen2 model -> a base directory (model.base_checkpoint=DIR)
    convert mcore-to-hf --checkpoint CKPT --base DIR --out HF_DIR
            a trained checkpoint -> a Hugging Face model folder (e.g. for lm-evaluation-harness)
    data build TASK --n N --out FILE.jsonl [--test-n M --test-out FILE]
            chat-format task data: gsm_symbolic, countdown, medcalc
    eval    --checkpoint CKPT --config RUN_DIR/config.yaml --tasks mmlu,humaneval,...
            benchmarks on a checkpoint (mmlu, humaneval, gsm_symbolic, countdown, medcalc)
    report  RUNS_DIR --domain TASK
            the experiment's table from the eval --out files in RUNS_DIR

One process: `nemo-anchored ...`; many: `torchrun --nproc_per_node=N -m nemo_anchored ...` with
the same arguments. The configuration is validated before any process group starts.

A mistake to fix (recipe, data, checkpoint, arguments, a full disk) is reported in one line,
`nemo-anchored COMMAND: what and where`, with exit status 2; under torchrun once, naming the rank.
"""
import argparse
import errno
import hashlib
import os
import sys
from datetime import timedelta
from typing import Optional

import nemo_anchored  # __version__ (the package root belongs to no layer)
from nemo_anchored.errors import UserError
from nemo_anchored.lifetime import forked_children_die_with_this_process
from nemo_anchored.parallel.megatron_compat import filter_irrelevant_warnings

# Every sub-command's module builds its parser without loading torch or megatron-core (they
# are imported when a command runs), so that `--help` and argument errors come at once.
from nemo_anchored.cli import convert, data, lab, launch, report, train
from nemo_anchored.cli import eval as evaluate

# name: (help, add the command's arguments to its parser, run it: args -> exit status)
COMMANDS = {
    "sft": ("SFT reference and the baselines", train.add_arguments, train.run),
    "anchor": ("Anchored Learning", train.add_arguments, train.run),
    "launch": ("both stages on a cluster or this machine (NeMo-Run, sbatch)",
               launch.add_arguments, launch.run),
    "lab": ("forgetting lab: every method over a learning-rate sweep and seeds",
            lab.add_arguments, lab.run),
    "convert": ("Hugging Face <-> nemo-anchored checkpoint conversion",
                convert.add_arguments, convert.run),
    "data": ("build chat-format task data (JSONL)", data.add_arguments, data.run),
    "eval": ("benchmarks on a checkpoint", evaluate.add_arguments, evaluate.run),
    "report": ("the experiment's table from `eval --out` files", report.add_arguments,
               report.run),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-anchored", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--version", action="version",
                        version=f"nemo-anchored {nemo_anchored.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (text, add_arguments, _) in COMMANDS.items():
        add_arguments(commands.add_parser(name, help=text))
    return parser


def _expected_failure(error: Exception) -> Optional[str]:
    """The one-line report of an expected failure; None for anything else: a bug, whose
    traceback must stay visible."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on {error.filename or 'the device'}"
    if isinstance(error, OSError) and error.filename and error.errno in (
            errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR):
        return f"cannot write {error.filename}: {error.strerror}"
    return None


def _first_to_report(line: str) -> bool:
    """Whether this rank is the first of the torchrun launch to report ``line``.

    Under torchrun every rank runs the command. Most expected failures are raised identically
    on every rank (the configuration is validated before any process group starts, every rank
    reads the whole data file, checkpoint checks and training stops are decided together), but
    some are one rank's own (its disk, its device), and a rank cannot tell which kind it has.
    So the ranks count each line in torchrun's key-value store (its agent's, which outlives the
    ranks' process groups): each distinct failure is printed once, by the first rank to reach
    it. Without that store (another launcher, or it cannot be reached) every failing rank
    prints: a failure reported twice beats one never reported.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return True
    import torch.distributed as dist

    digest = hashlib.sha256(line.encode()).hexdigest()
    key = f"nemo_anchored/failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{digest}"
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=30))
        return store.add(key, 1) == 1
    except RuntimeError:  # torch.distributed's store errors
        return True


def _report(line: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if not _first_to_report(line):
            return
        line = f"[rank {os.environ.get('RANK', '0')}] {line}"
    print(line, file=sys.stderr)


def main(argv=None) -> None:
    filter_irrelevant_warnings()
    forked_children_die_with_this_process()
    args = _parser().parse_args(argv)
    try:
        status = COMMANDS[args.command][2](args)
    except Exception as error:
        message = _expected_failure(error)
        if message is None:
            raise
        _report(f"nemo-anchored {args.command}: {message}")
        status = 2
    sys.exit(status)
