"""The command line answers a mistake to fix (recipe, data, checkpoint, arguments, a full disk)
with one line, `nemo-anchored COMMAND: what and where`, and exit status 2; under torchrun once,
naming the rank. Anything else is a bug and keeps its traceback.

Failures caught before any process group starts run in this process (fast); those inside a
training run or under torchrun start processes (slow).
"""
import errno
import re
import shutil
import subprocess
import sys

import pytest

import nemo_anchored

from nemo_anchored.checkpoint.format import CheckpointError
from nemo_anchored.cli import main as cli_main
from nemo_anchored.config import ConfigError
from nemo_anchored.data import BatchOrder, ConversationError, DataError, TokenizerError
from nemo_anchored.errors import UserError
from nemo_anchored.eval.loaders import BenchmarkDataError
from tests.launch import REPO as ROOT, free_port, worker_env

RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
TINY_DATA = ROOT / "recipes" / "data" / "tiny_sft.jsonl"


def run_in_process(capsys, *argv) -> tuple:
    """(exit status, stderr lines) of `nemo-anchored ARGV` in this process; any exception
    other than SystemExit (a traceback) fails the test."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main([str(a) for a in argv])
    return exit_info.value.code, capsys.readouterr().err.splitlines()


def test_expected_failure_classes_share_one_base_and_keep_their_own():
    for cls, old_base in [(ConfigError, ValueError), (DataError, ValueError),
                          (TokenizerError, ValueError), (ConversationError, ValueError),
                          (BenchmarkDataError, ValueError), (CheckpointError, RuntimeError)]:
        assert issubclass(cls, UserError) and issubclass(cls, old_base), cls


@pytest.mark.parametrize("case", ["yaml_syntax", "top_level_list", "unknown_key",
                                  "bad_interpolation", "missing_data_file"])
def test_recipe_and_configuration_errors_are_one_line(case, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    overrides = [f"logging.dir={tmp_path / 'run'}"]
    if case == "yaml_syntax":
        recipe.write_text("name: x\ntrainer: {global_batch_size: 8\n")
        expected = f"{recipe}:3:1: invalid YAML: did not find expected ',' or '}}'"
    elif case == "top_level_list":
        recipe.write_text("- trainer\n- model\n")
        expected = f"{recipe}: the top level is a list, not a mapping of sections"
    elif case == "unknown_key":
        recipe.write_text(RECIPE.read_text().replace("  epochs: 2\n", "  epochs: 2\n  epoch: 3\n"))
        expected = f"{recipe}: trainer.epoch: Key 'epoch' not in 'TrainerConfig'"
    elif case == "bad_interpolation":
        recipe.write_text(RECIPE.read_text().replace("name: tiny_cpu", "name: tiny_${method"))
        expected = f"{recipe}: name: "  # then the grammar's words for it
    else:
        recipe = RECIPE
        overrides.append("data.train_path=/no/such/train.jsonl")
        expected = "data.train_path: '/no/such/train.jsonl' does not exist"
    status, lines = run_in_process(capsys, "sft", "--config", recipe, *overrides)
    assert status == 2
    assert len(lines) == 1 and lines[0].startswith(f"nemo-anchored sft: {expected}"), lines
    assert not (tmp_path / "run").exists()


def test_recipe_paths_resolve_against_the_recipe_and_a_missing_one_names_where(
        tmp_path, capsys, monkeypatch):
    """Inputs written in a recipe are relative to its folder (${cwd:}: the working directory),
    inputs given as key=value to the working directory; a missing one is reported absolute."""
    from omegaconf import OmegaConf

    from nemo_anchored.config import load_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    recipe = OmegaConf.load(RECIPE)
    recipe.model.base_checkpoint = "${cwd:}/converted"
    OmegaConf.save(recipe, tmp_path / "sub" / "recipe.yaml")
    status, lines = run_in_process(capsys, "sft", "--config", "sub/recipe.yaml")
    assert status == 2 and lines == [
        f"nemo-anchored sft: data.train_path: '{tmp_path}/sub/data/tiny_sft.jsonl' does not "
        "exist (a relative path in a recipe is relative to the recipe's folder; on the "
        "command line, to the working directory)"]
    (tmp_path / "sub" / "data").mkdir()
    shutil.copy(TINY_DATA, tmp_path / "sub" / "data")
    shutil.copy(TINY_DATA, tmp_path / "mine.jsonl")
    cfg = load_config("sub/recipe.yaml", check_paths=False)
    assert cfg.data.train_path == f"{tmp_path}/sub/data/tiny_sft.jsonl"
    assert cfg.model.base_checkpoint == f"{tmp_path}/converted"
    cfg = load_config("sub/recipe.yaml", ["data.train_path=mine.jsonl"], check_paths=False)
    assert cfg.data.train_path == f"{tmp_path}/mine.jsonl"


def test_config_names_a_shipped_recipe(tmp_path, capsys, monkeypatch):
    from nemo_anchored.config import load_config

    monkeypatch.chdir(tmp_path)  # outside the repository
    for name in ("tiny_cpu", "tiny_cpu.yaml"):
        assert load_config(name).data.train_path == str(TINY_DATA.resolve())
    status, lines = run_in_process(capsys, "sft", "--config", "tiny_cpu_typo")
    assert status == 2 and len(lines) == 1
    assert lines[0].startswith(f"nemo-anchored sft: --config: 'tiny_cpu_typo' is neither a "
                               f"recipe file (looked in {tmp_path}) nor a shipped recipe (")
    assert "tiny_cpu," in lines[0] or lines[0].endswith("tiny_cpu)")
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"nemo-anchored {nemo_anchored.__version__}\n"


def test_every_command_reports_through_the_same_handler(tmp_path, capsys):
    cases = [
        (["report", tmp_path, "--domain", "countdown"],
         f"nemo-anchored report: {tmp_path}: no eval_*.json"),
        (["lab", "--out", tmp_path / "lab", "--seeds", "0"],
         "nemo-anchored lab: seeds must be >= 1"),
        (["lab", "--out", tmp_path / "lab", "--jobs", "0"],
         "nemo-anchored lab: --jobs 0: must be >= 1"),
        (["lab", "--out", tmp_path / "lab", "--smoke", "--jobs", "2"],
         "nemo-anchored lab: --jobs: the tiny lab's fine-tunings only"),
        (["lab", "--out", tmp_path / "lab", "--seed-index", "3"],
         "nemo-anchored lab: seed_indices [3]: distinct indices of the 3 seeds, each in 0..2"),
        (["lab", "--out", tmp_path / "lab", "--smoke", "--seed-index", "0"],
         "nemo-anchored lab: --seed-index: the tiny lab's"),
        (["lab", "--out", tmp_path / "lab", "--merge", tmp_path / "shard"],
         f"nemo-anchored lab: {tmp_path / 'shard'}: no results.json: that shard's lab has not "
         "finished"),
        (["lab", "--out", tmp_path / "lab", "--merge", tmp_path / "shard", "--full"],
         "nemo-anchored lab: --merge: the shards' results.json hold their settings; --full "
         "would change nothing"),
        (["lab", "--out", tmp_path / "shard", "--merge", tmp_path / "shard"],
         f"nemo-anchored lab: --out {tmp_path / 'shard'} is one of the shards"),
        (["eval", "--hf", tmp_path, "--tasks", "mmlu,gsm8k"],
         "nemo-anchored eval: --tasks: gsm8k; expected some of"),
        (["eval", "--hf", tmp_path, "--tasks", "mmlu"],
         f"nemo-anchored eval: --hf {tmp_path}: no config.json"),
        # 0 ran the task's default budget (512 new tokens) under a record saying 0.
        (["eval", "--hf", tmp_path, "--tasks", "mmlu", "--max-new-tokens", "0"],
         "nemo-anchored eval: --max-new-tokens must be >= 1"),
        (["eval", "--hf", tmp_path, "--tasks", "mmlu", "--timeout", "0"],
         "nemo-anchored eval: --timeout must be > 0 seconds"),
        (["data", "build", "countdown", "--n", "-1", "--out", tmp_path / "d.jsonl"],
         "nemo-anchored data build: --n and --test-n must be >= 0"),
    ]
    for argv, expected in cases:
        status, lines = run_in_process(capsys, *argv)
        assert status == 2 and len(lines) == 1 and lines[0].startswith(expected), (argv, lines)


def _report_raising(monkeypatch, error):
    """`nemo-anchored report` now raises ``error``."""
    def run(args):
        raise error

    text, add_arguments, _ = cli_main.COMMANDS["report"]
    monkeypatch.setitem(cli_main.COMMANDS, "report", (text, add_arguments, run))


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    full = tmp_path / "runs" / "metrics.jsonl"
    _report_raising(monkeypatch, OSError(errno.ENOSPC, "No space left on device", str(full)))
    status, lines = run_in_process(capsys, "report", tmp_path, "--domain", "x")
    assert status == 2 and lines == [f"nemo-anchored report: no space left on {full}"]


@pytest.mark.parametrize("bug", [RuntimeError("a bug"), ValueError("a bug"), KeyError("a bug"),
                                 FileNotFoundError(errno.ENOENT, "No such file", "/x")])
def test_unexpected_exceptions_keep_their_traceback(bug, tmp_path, capsys, monkeypatch):
    _report_raising(monkeypatch, bug)
    with pytest.raises(type(bug)) as raised:
        cli_main.main(["report", str(tmp_path), "--domain", "x"])
    assert raised.value is bug  # out of main as raised: Python prints its traceback
    assert capsys.readouterr().err == ""  # nothing reported in its place


def test_ranks_report_each_distinct_failure_once(tmp_path, capsys, monkeypatch):
    import torch.distributed as dist

    # torchrun's agent store, as its ranks see it.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(store.port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    shared, own = tmp_path / "shared", tmp_path / "own"
    shared.mkdir()
    own.mkdir()

    def fail_on(rank, folder):
        monkeypatch.setenv("RANK", str(rank))
        return run_in_process(capsys, "report", folder, "--domain", "x")

    # A failure every rank meets: printed by the first, with its rank; the others stay silent.
    assert fail_on(0, shared) == (2, [f"[rank 0] nemo-anchored report: {shared}: no "
                                      "eval_*.json (run `nemo-anchored eval --out`)"])
    assert fail_on(1, shared) == (2, [])
    # A failure of one rank's own is printed by that rank.
    status, lines = fail_on(1, own)
    assert status == 2 and len(lines) == 1 and lines[0].startswith(
        f"[rank 1] nemo-anchored report: {own}: no eval_*.json")
    # Without torchrun's store every failing rank prints: twice rather than never.
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE")
    status, lines = fail_on(1, shared)
    assert status == 2 and len(lines) == 1 and lines[0].startswith("[rank 1] ")


def test_fewer_examples_than_a_global_batch_is_a_data_error():
    with pytest.raises(DataError) as raised:
        BatchOrder(3, 8, 4, 0, 1, seed=0, train_path="data/small.jsonl")
    assert str(raised.value) == ("data.train_path=data/small.jsonl has 3 examples, fewer than "
                                 "one global batch (trainer.global_batch_size=8)")


# --------------------------------------------------------------- processes (slow)


def _our_lines(stderr: str, command: str) -> list:
    """The CLI's report lines, without library warnings or torchrun's own summary."""
    return [line for line in stderr.splitlines() if f"nemo-anchored {command}: " in line]


def _no_traceback_of_ours(stderr: str) -> bool:
    return not any(line.lstrip().startswith("File ") and "nemo_anchored" in line
                   for line in stderr.splitlines())


@pytest.mark.slow
def test_a_training_run_stops_with_one_line_on_a_checkpoint_error(tmp_path):
    empty = tmp_path / "not_a_checkpoint"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "nemo_anchored", "sft", "--config", str(RECIPE),
         f"model.base_checkpoint={empty}", f"logging.dir={tmp_path / 'run'}",
         "logging.tensorboard=false", "logging.progress=false"],
        env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = _our_lines(result.stderr, "sft")
    assert len(lines) == 1 and lines[0] == (
        f"nemo-anchored sft: model.base_checkpoint: {empty} is not a checkpoint (no "
        "complete.json, no checkpoint files)"), result.stderr[-3000:]


@pytest.mark.slow
def test_torchrun_reports_a_failure_once_naming_the_rank(tmp_path):
    # Every rank loads the 3 examples and meets the same error after the process group started.
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(TINY_DATA.read_text().splitlines()[:3]) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node=2",
         "--master-addr", "127.0.0.1", f"--master-port={free_port()}", "-m", "nemo_anchored",
         "sft", "--config", str(RECIPE), f"data.train_path={small}",
         "trainer.global_batch_size=8", "trainer.micro_batch_size=4",
         f"logging.dir={tmp_path / 'run'}", "logging.tensorboard=false"],
        env=worker_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-3000:]
    lines = _our_lines(result.stderr, "sft")
    assert len(lines) == 1, result.stderr[-3000:]
    assert re.fullmatch(r"\[rank [01]\] nemo-anchored sft: .*has 3 examples, fewer than one "
                        r"global batch \(trainer\.global_batch_size=8\)", lines[0]), lines
    # torchrun prints a traceback of its own (ChildFailedError); the ranks print none.
    assert _no_traceback_of_ours(result.stderr), result.stderr[-3000:]


@pytest.mark.slow  # imports megatron-core and transformers
def test_convert_rejects_a_folder_that_is_not_a_checkpoint(tmp_path, capsys):
    from nemo_anchored.models.hf_layout import ConversionError

    assert issubclass(ConversionError, UserError) and issubclass(ConversionError, ValueError)
    # An hf-to-mcore output's shape (hf/config.json, tokenizer/), and a raw model folder.
    base = tmp_path / "base"
    (base / "tokenizer").mkdir(parents=True)
    (base / "hf").mkdir()
    (base / "hf" / "config.json").write_text(
        '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, '
        '"intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, '
        '"num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 64, '
        '"rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": true}')
    raw = tmp_path / "raw_model"
    raw.mkdir()
    (raw / "model.safetensors").write_bytes(b"")
    out = tmp_path / "exported"
    status, lines = run_in_process(capsys, "convert", "mcore-to-hf", "--checkpoint", raw,
                                   "--base", base, "--out", out)
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"nemo-anchored convert: {raw} is not a checkpoint"), lines
    assert not out.exists()
