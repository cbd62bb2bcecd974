"""bench/run_gpu.sh's benchmark command lines are accepted by the benchmarks' own options, and
the training configs its step-time runs build pass the config's validation, so that a renamed
option or an invalid combination at the GPU sizes shows up here rather than in a GPU call's few
minutes. Nothing is measured or trained: each script's main() runs until its parser has read
the line, and stops there."""
import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from nemo_anchored.cli.train import method_overrides
from nemo_anchored.config import load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"bench_anchored_kl.py", "bench_sft_losses.py", "bench_step_time.py"}


def benchmark_commands() -> list[tuple[str, list[str]]]:
    """(script, arguments) of each `python3 bench/NAME.py ...` in run_gpu.sh, continuation lines
    joined, the arguments ending at the first redirection or pipe."""
    text = (ROOT / "bench" / "run_gpu.sh").read_text().replace("\\\n", " ")
    commands = []
    for script, rest in re.findall(r"python3 bench/(\w+\.py)(.*)", text):
        words = shlex.split(rest, comments=True)
        end = next((i for i, w in enumerate(words) if re.match(r"\d*[<>]|\||&&|;", w)),
                   len(words))
        commands.append((script, words[:end]))
    return commands


class Parsed(Exception):
    pass


@pytest.fixture
def parsed(monkeypatch) -> list[tuple[str, object, argparse.Namespace]]:
    """(script, its module, the namespace its parser made) of each benchmark command. A line
    the parser refuses fails here, with argparse's message."""
    commands = benchmark_commands()
    assert {script for script, _ in commands} == SCRIPTS, commands
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        raise Parsed(parse_args(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    found = []
    for script, args in commands:
        monkeypatch.setattr(sys, "argv", [f"bench/{script}", *args])
        module = importlib.import_module(script.removesuffix(".py"))
        with pytest.raises(Parsed) as stop:  # an unknown option exits (2) instead
            module.main()
        found.append((script, module, stop.value.args[0]))
    return found


def test_the_benchmark_commands_parse_for_the_gpu(parsed):
    for script, _, namespace in parsed:
        assert namespace.device == "cuda", script


def test_the_step_time_runs_build_valid_configs(parsed):
    runs = [(module, namespace) for script, module, namespace in parsed
            if script == "bench_step_time.py"]
    assert len(runs) == 2  # two model sizes
    start = ["model.base_checkpoint=base", "model.reference_checkpoint=final"]
    for module, namespace in runs:
        model, steps = module.run_overrides(namespace)
        load_config(module.RECIPE, [*model, "trainer.max_steps=1"], check_paths=False)
        for command, extra in module.METHODS.values():
            overrides = method_overrides(command, module.RECIPE,
                                         [*model, *steps, *start, *extra])
            load_config(module.RECIPE, overrides, check_paths=False)
