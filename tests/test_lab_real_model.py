"""The real-model lab (lab/real_model.py): its dry-run plan and estimate, the instruction checks
it scores general skills with, and the --smoke run end to end (SmolLM2-135M-Instruct on the
CPU)."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_anchored.lab import real_model
from nemo_anchored.lab.instructions import KINDS, build_instructions, follows

ROOT = Path(__file__).resolve().parents[1]


def test_param_count_of_smollm2_135m():
    from nemo_anchored.config import load_config

    cfg = load_config(real_model.RECIPES["gsm_symbolic"], check_paths=False)
    # By hand: per layer q and o 576 x 576, k and v 576 x 192, gate, up and down 576 x 1536,
    # two norms of 576; 30 layers; the tied 49152 x 576 embedding once; the final norm.
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert real_model.param_count(cfg.model) == 30 * layer + 49152 * 576 + 576 == 134_515_008


def test_dry_run_lists_every_training_with_its_compute_and_fits_ten_minutes():
    lines = real_model.plan_lines(real_model.GPU)
    rows = {line.split()[0]: line.split()[1:] for line in lines
            if line.split() and line.split()[0].startswith(("reference", "sft", "low_sft",
                                                            "kl_sft", "anchored"))}
    s = real_model.GPU
    # One training per distinct (objective, lr): the reference is sft at reference_lr, and
    # low_sft's lrs are not sft's here.
    expected = ({"reference_e2"} | {f"sft_lr{lr:g}" for lr in s.lrs if lr != s.reference_lr}
                | {f"low_sft_lr{lr:g}" for lr in s.low_lrs}
                | {f"{m}_lr{lr:g}" for m in ("kl_sft", "anchored_live", "anchored_logit")
                   for lr in s.lrs})
    assert set(rows) == expected
    # 1024 examples / 32 = 32 steps per epoch, 2 epochs, 32 x 512 tokens per step; forward-
    # equivalent passes 3 x tokens (sft), 4 x (kl_sft, live: one frozen forward), 5 x (snapshot)
    tokens = 64 * 32 * 512
    assert rows["reference_e2"][:3] == ["64", str(tokens), f"{3 * tokens:.3g}"]
    assert rows["kl_sft_lr1e-05"][2] == f"{4 * tokens:.3g}"
    assert rows["anchored_live_lr1e-05"][2] == f"{4 * tokens:.3g}"
    assert rows["anchored_logit_lr1e-05"][2] == f"{5 * tokens:.3g}"
    # GPU seconds: 2 x params x passes / (800e12 x utilisation) + the per-training overhead
    seconds = 2 * 134_515_008 * 3 * tokens / (800e12 * real_model.UTILISATION) \
        + real_model.RUN_OVERHEAD_S
    assert float(rows["reference_e2"][3]) == pytest.approx(seconds, abs=0.05)
    assert "within the 10-minute budget" in lines[-1]
    assert any("6 x params x trained tokens" in line for line in lines)
    # medcalc keeps its recipe's 1088 positions (at 512, 372 of its 1024 examples would drop).
    medcalc = real_model.plan_lines(dataclasses.replace(s, task="medcalc"))
    assert "(batch 32 x 1088 tokens)" in medcalc[0]
    assert "within the 10-minute budget" in medcalc[-1]


def test_instruction_checks_by_hand():
    items = build_instructions(8, seed=3)
    assert items == build_instructions(8, seed=3)
    assert [i["kind"] for i in items] == list(KINDS) * 2
    repeat = {"kind": "repeat", "target": "apple"}
    assert follows(repeat, ' "Apple." ') and not follows(repeat, "apple pie")
    upper = {"kind": "uppercase", "target": "RIVER"}
    assert follows(upper, "Sure: RIVER") and not follows(upper, "River")
    total = {"kind": "sum", "target": "17"}
    assert follows(total, "17") and follows(total, "The answer is 17.")
    assert not follows(total, "It is 170") and not follows(total, "8 + 9 = 17")
    end = {"kind": "end_with", "target": "lemon"}
    assert follows(end, "Blue. Lemon!") and not follows(end, "Lemon is yellow.")
    for item in items:  # every built item has a response that follows it
        answer = {"repeat": item["target"], "uppercase": item["target"], "sum": item["target"],
                  "end_with": f"Red {item['target']}."}[item["kind"]]
        assert follows(item, answer), item


@pytest.mark.slow
@pytest.mark.real_model
def test_smoke_run_end_to_end(tmp_path, hf_conversions):
    """`nemo-anchored lab --smoke`: the reference, every method, the evaluation with signal and
    drift, results.json and pareto.png. The base is the session's conversion of the same GGUF
    file (`convert hf-to-mcore`, which the lab calls when given no base; tests/test_hf_convert.py
    checks it against transformers), so the suite converts the 135M model once."""
    work, _ = hf_conversions
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "nemo_anchored", "lab", "--smoke", "--out",
                             str(tmp_path / "lab"), "--base-checkpoint",
                             str(work / "mcore" / "smollm2")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((tmp_path / "lab" / "results.json").read_text())
    s = real_model.SMOKE
    assert {p["method"] for p in results["points"]} == set(s.methods)
    anchored = [p for p in results["points"] if p["method"].startswith("anchored")]
    assert sorted(p["outer"] for p in anchored) == [1, 1, 2, 2]
    base = results["base"]
    assert base["kl_to_base_general"] == pytest.approx(0.0, abs=1e-9)
    assert set(base["signal"]) == {"instructions", "mmlu", "mmlu_logprob"}
    assert base["signal"]["mmlu"]["n"] == s.mmlu_n
    assert base["signal"]["mmlu_logprob"]["chance"] == pytest.approx(math.log(0.25))
    assert results["config"]["general_metric"] in ("instructions", "mmlu")
    for d in results["point_details"]:
        assert d["kl_to_base_general"] >= 0 and 0 <= d["domain"] <= 1
        assert set(d["general_by_task"]) == {"instructions", "mmlu", "mmlu_logprob"}
    assert (tmp_path / "lab" / "pareto.png").stat().st_size > 1000
    print(f"smoke wall time: {wall:.0f} s")
