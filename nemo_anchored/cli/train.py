"""`nemo-anchored sft|anchor --config RECIPE.yaml [key=value ...]`: the two training stages.

The configuration is validated before any process group starts (under torchrun every rank runs
this); its errors, like the data's and checkpoints', are reported by cli/main.py.
"""
import argparse
import os

from nemo_anchored.config import SFT_METHODS, ConfigError, load_config, read_recipe


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", required=True, help="recipe YAML (see recipes/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="OmegaConf dot-list overrides, e.g. optim.lr=1e-5")
    return parser


def method_overrides(command: str, recipe, overrides: list) -> list:
    """The overrides `nemo-anchored COMMAND --config RECIPE ...` trains with. The command fixes
    the stage: `anchor` runs method=anchored; `sft` runs the method given on the command line,
    else the recipe's (sft when the recipe is an anchored one)."""
    recipe_method = read_recipe(recipe).get("method", "sft")
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


def run(args) -> int:
    overrides = method_overrides(args.command, args.config, list(args.overrides))
    cfg = load_config(args.config, overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))

    from nemo_anchored.training.trainer import run as train

    train(cfg)
    return 0
