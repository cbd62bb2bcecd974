"""The package's shape: layers that only point down, and megatron's patches whatever the
import order."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nemo_anchored"

# Higher imports lower, never the reverse. The ground modules may import each other.
LAYERS = {"cli": 5, "__main__": 5, "lab": 4, "eval": 3, "training": 2, "models": 1}
GROUND = ("ops", "parallel", "data", "config", "checkpoint", "atomic", "errors", "host", "lifetime",
          "__init__")


def _layer(top: str) -> int:
    if top in LAYERS:
        return LAYERS[top]
    assert top in GROUND, f"nemo_anchored.{top} belongs to no layer: add it to LAYERS or GROUND"
    return 0


def _imported_packages(path: Path):
    """The first component below nemo_anchored of every nemo_anchored import in ``path``
    (wherever it stands: module top, function body, TYPE_CHECKING block)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "nemo_anchored":  # from nemo_anchored import ops
                names = [f"nemo_anchored.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "nemo_anchored" and len(parts) > 1 and parts[1] != "_C":
                yield node.lineno, parts[1]


def _top(path: Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_layers_only_point_down():
    violations = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30, "the package was not found"
    for path in files:
        top = _top(path)
        for line, imported in _imported_packages(path):
            if _layer(imported) > _layer(top):
                violations.append(f"{path.relative_to(ROOT)}:{line}: {top} imports {imported}")
    assert not violations, "a lower layer imports a higher one:\n" + "\n".join(violations)


def test_the_layer_check_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from nemo_anchored.training.trainer import run\n")
    assert list(_imported_packages(bad)) == [(2, "training")]


def test_library_modules_have_no_command_line_of_their_own():
    offenders = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
                 if _top(p) not in ("cli", "__main__")
                 and re.search(r"^if __name__ == .__main__.:", p.read_text(), re.MULTILINE)]
    assert not offenders, f"library modules with a __main__ block: {offenders}"


# megatron first, then the package: the patches must still take (or the import fail loudly).
_MEGATRON_FIRST = r"""
import megatron.core
import megatron.core.optimizer.distrib_optimizer as distrib_optimizer
import megatron.core.pipeline_parallel
import megatron.core.tensor_parallel.random as mcore_random
mcore_random.initialize_rng_tracker()  # a tracker of megatron's own, made before any patch
shipped = distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states

import torch
from nemo_anchored.config import GPTConfig
from nemo_anchored.models.gpt import build_gpt_model
from nemo_anchored.parallel import megatron_compat
from nemo_anchored.parallel.distributed import model_parallel

with model_parallel(1, 1, seed=3):
    applied = megatron_compat.install()
    assert "cpu" in applied, applied
    assert type(mcore_random.get_cuda_rng_tracker()).__name__ == "CpuRNGStatesTracker"
    if not distrib_optimizer.HAVE_APEX_OR_TE:
        assert "distributed_optimizer_step" in applied, applied
        assert distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states \
            is not shipped
    cfg = GPTConfig(num_layers=1, hidden_size=16, num_attention_heads=2, vocab_size=40,
                    max_seq_len=8, hidden_dropout=0.5, make_vocab_size_divisible_by=8)
    model = build_gpt_model(cfg)
    tokens = torch.arange(8).view(1, 8)
    logits = model(tokens, tokens.clone(), None)
    logits.float().sum().backward()  # dropout draws from the patched tracker
    assert logits.shape == (1, 8, 40)
print("OK")
"""


@pytest.mark.slow
def test_importing_megatron_first_still_works():
    result = subprocess.run([sys.executable, "-c", _MEGATRON_FIRST], cwd=ROOT,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr[-3000:]
