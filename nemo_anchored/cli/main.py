"""nemo-anchored sft|anchor --config RECIPE.yaml [key=value ...] | lab --out DIR | convert ...

    sft     stage 1: plain SFT from the base (writes the reference: RUN_DIR/final), and the
            baselines through the same command (method=low_sft|kl_sft|dft|stm)
    anchor  stage 2: Anchored Learning toward model.reference_checkpoint
    lab     the forgetting lab: domain gain against general-skill loss, every method
    convert hf-to-mcore --hf PATH --out DIR [--tp N --pp M] [--gguf-file NAME]
            a Hugging Face Llama/Qwen2 model -> a base directory (model.base_checkpoint=DIR)
    convert mcore-to-hf --checkpoint CKPT --base DIR --out HF_DIR
            a trained checkpoint -> a Hugging Face model folder (e.g. for lm-evaluation-harness)
    data build TASK --n N --out FILE.jsonl [--test-n M --test-out FILE]
            chat-format task data: gsm_symbolic, countdown, medcalc
    eval    --checkpoint CKPT --config RUN_DIR/config.yaml --tasks mmlu,humaneval,...
            benchmarks on a checkpoint (mmlu, humaneval, gsm_symbolic, countdown, medcalc)

One process: `nemo-anchored ...`; many: `torchrun --nproc_per_node=N -m nemo_anchored ...` with
the same arguments. The configuration is validated before any process group starts.
"""
import argparse
import os
import sys

from omegaconf import OmegaConf

from nemo_anchored.config import SFT_METHODS, ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nemo-anchored", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("sft", "SFT reference and the baselines"),
                       ("anchor", "Anchored Learning")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
        sub.add_argument("overrides", nargs="*", metavar="key=value",
                         help="OmegaConf dot-list overrides, e.g. optim.lr=1e-5")
    from nemo_anchored.lab.run import add_lab_arguments

    add_lab_arguments(commands.add_parser(
        "lab", help="forgetting lab: every method over a learning-rate sweep and seeds"))
    from nemo_anchored.cli.convert import add_convert_arguments

    add_convert_arguments(commands.add_parser(
        "convert", help="Hugging Face <-> nemo-anchored checkpoint conversion"))
    from nemo_anchored.data.builders import add_data_arguments
    from nemo_anchored.eval.benchmarks import add_eval_arguments

    add_data_arguments(commands.add_parser("data", help="build chat-format task data (JSONL)"))
    add_eval_arguments(commands.add_parser("eval", help="benchmarks on a checkpoint"))
    return parser


def _method_overrides(command: str, recipe_method: str, overrides: list) -> list:
    """The command fixes the stage: `anchor` runs method=anchored; `sft` runs the method given
    on the command line, else the recipe's (sft when the recipe is an anchored one)."""
    given = [o.split("=", 1)[1] for o in overrides if o.startswith("method=")]
    if command == "anchor":
        if given and given[-1] != "anchored":
            raise ConfigError(f"method={given[-1]}: `nemo-anchored anchor` runs method=anchored; "
                              f"use `nemo-anchored sft` for {', '.join(SFT_METHODS)}")
        return ["method=anchored", *overrides]
    if given and given[-1] not in SFT_METHODS:
        raise ConfigError(f"method={given[-1]}: `nemo-anchored sft` runs "
                          f"{', '.join(SFT_METHODS)}; use `nemo-anchored anchor` for anchored")
    return ["method=sft", *overrides] if not given and recipe_method == "anchored" else overrides


def main(argv=None) -> None:
    args = _parser().parse_args(argv)
    if args.command == "lab":
        from nemo_anchored.lab.run import main_from_args

        sys.exit(main_from_args(args))
    if args.command == "convert":
        from nemo_anchored.cli.convert import main_from_args as convert_main

        sys.exit(convert_main(args))
    if args.command == "data":
        from nemo_anchored.data.builders import data_main

        sys.exit(data_main(args))
    if args.command == "eval":
        from nemo_anchored.eval.benchmarks import eval_main

        sys.exit(eval_main(args))
    rank = int(os.environ.get("RANK", "0"))
    try:
        recipe_method = OmegaConf.load(args.config).get("method", "sft") \
            if os.path.isfile(args.config) else "sft"
        overrides = _method_overrides(args.command, recipe_method, list(args.overrides))
        cfg = load_config(args.config, overrides,
                          world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        if rank == 0:
            print(f"nemo-anchored: configuration error: {error}", file=sys.stderr)
        sys.exit(2)

    from nemo_anchored.data import DataError
    from nemo_anchored.training.trainer import run

    try:
        run(cfg)
    except (ConfigError, DataError) as error:
        if rank == 0:
            print(f"nemo-anchored: {error}", file=sys.stderr)
        sys.exit(2)
