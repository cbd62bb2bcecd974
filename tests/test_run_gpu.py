"""bench/run_gpu.sh's benchmark command lines are accepted by the benchmarks' own options, so a
renamed or dropped option shows up here rather than in a GPU call's few minutes. Nothing is
measured: each script's main() runs until its parser has read the line, and stops there."""
import argparse
import importlib
import re
import shlex
import sys
from pathlib import Path

import pytest

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


def test_the_benchmark_commands_parse(monkeypatch):
    commands = benchmark_commands()
    assert {script for script, _ in commands} == SCRIPTS, commands
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        raise Parsed(parse_args(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for script, args in commands:
        monkeypatch.setattr(sys, "argv", [f"bench/{script}", *args])
        module = importlib.import_module(script.removesuffix(".py"))
        with pytest.raises(Parsed) as parsed:  # an unknown option exits (2) instead
            module.main()
        namespace = parsed.value.args[0]
        assert namespace.device == "cuda", (script, args)
