"""The lab's budget arms and compute accounting (lab/budget.py): compute per point on a
hand-made plan, which trainings each arm plans, the settings' rules, outer iterations as sweep
points, and a tiny lab with every arm and an alpha sweep end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nemo_anchored.lab.budget import PointSpec, Stage, compute, point_specs, reference_epochs
from nemo_anchored.lab.settings import LabSettings
from nemo_anchored.lab.summary import summarize

ROOT = Path(__file__).resolve().parents[1]


def test_compute_on_a_hand_made_plan():
    plan = {
        "ref": Stage(steps=4, tokens_per_step=10),
        "kl": Stage(steps=6, tokens_per_step=10, frozen_forwards=1, depends_on="ref"),
        "snap": Stage(steps=10, tokens_per_step=10, frozen_forwards=2, depends_on="ref"),
        "stm": Stage(steps=3, tokens_per_step=10, prepass_tokens=7),
        "chain": Stage(steps=1, tokens_per_step=5, depends_on="kl"),
    }
    # ref: 40 tokens trained: 40 forward, 40 backward; 40 + 2 x 40 = 120
    assert compute(plan, "ref") == {"forward": 40, "backward": 40, "forward_equivalent": 120}
    # kl: 60 trained, each with the reference's forward: 120 forward + ref's 40; 60 + 40 back
    assert compute(plan, "kl") == {"forward": 160, "backward": 100, "forward_equivalent": 360}
    # snap after 5 of its 10 steps: 50 trained x (policy + reference + snapshot) = 150, + 40
    assert compute(plan, "snap", steps=5) == {"forward": 190, "backward": 90,
                                              "forward_equivalent": 370}
    assert compute(plan, "snap")["forward_equivalent"] == 300 + 40 + 2 * 140
    # stm: 30 trained + its 7 forward-only tokens before training
    assert compute(plan, "stm") == {"forward": 37, "backward": 30, "forward_equivalent": 97}
    # dependencies chain: 5 + kl's 160 forward, 5 + 100 backward
    assert compute(plan, "chain") == {"forward": 165, "backward": 105, "forward_equivalent": 375}
    with pytest.raises(ValueError, match=r"snap: steps=11 is outside \[0, 10\]"):
        compute(plan, "snap", steps=11)


def _settings(**kw):
    base = dict(methods=("sft", "low_sft", "kl_sft", "anchored_logit", "anchored_live"),
                epochs=4, outer_iterations=2, inner_epochs=2, lrs=(1e-4, 1e-3),
                low_lrs=(1e-5,), control_lrs=(1e-5, 1e-4), alphas=(0.2, 0.8),
                budgets=("equal", "authors", "control"))
    return LabSettings(**{**base, **kw})


def test_each_arm_plans_its_points():
    s = _settings()
    s.check()
    specs = list(point_specs(s))
    by_arm = {arm: [p for p in specs if p.arm == arm] for arm in ("equal", "authors", "control")}
    # equal: sft 2 lrs, low_sft 1, kl_sft 2, two anchored x 2 lrs x 2 alphas
    assert len(by_arm["equal"]) == 2 + 1 + 2 + 8
    assert {(p.outer_iterations, p.inner_epochs, p.reference_epochs) for p in by_arm["equal"]
            if p.alpha is not None} == {(2, 2, 4)}
    # authors: the snapshot variant T=5 x K=5 against a 3-epoch reference, live 1 x 5 against 1
    authors = {(p.method, p.epochs, p.outer_iterations, p.inner_epochs, p.reference_epochs)
               for p in by_arm["authors"]}
    assert authors == {("anchored_logit", 25, 5, 5, 3), ("anchored_live", 5, 1, 5, 1)}
    assert len(by_arm["authors"]) == 2 * 2 * 2
    # control: sft and kl_sft at each authors epoch count (5, 25) over control_lrs; kl_sft keeps
    # the equal arm's reference
    assert sorted((p.method, p.epochs, p.lr, p.reference_epochs) for p in by_arm["control"]) == [
        ("kl_sft", 5, 1e-5, 4), ("kl_sft", 5, 1e-4, 4), ("kl_sft", 25, 1e-5, 4),
        ("kl_sft", 25, 1e-4, 4), ("sft", 5, 1e-5, None), ("sft", 5, 1e-4, None),
        ("sft", 25, 1e-5, None), ("sft", 25, 1e-4, None)]
    assert reference_epochs(s) == [4, 3, 1]
    live = PointSpec("anchored_live", "authors", 1e-3, 5, 0.2, 1, 5, 1)
    assert live.series(True) == "anchored_live a0.2 authors"
    assert live.run_name(True) == "authors/anchored_live_a0.2_lr0.001"
    control = PointSpec("sft", "control", 1e-5, 25)
    assert (control.series(True), control.run_name(True)) == ("sft control25ep",
                                                              "control_e25/sft_lr1e-05")
    # a lab without arms or an alpha sweep keeps its names
    plain = PointSpec("anchored_logit", "equal", 1e-3, 4, 0.5, 2, 2, 4)
    assert (plain.series(False), plain.run_name(False)) == ("anchored_logit",
                                                            "anchored_logit_lr0.001")
    equal_only = list(point_specs(_settings(budgets=("equal",), alphas=(0.5,))))
    assert {p.arm for p in equal_only} == {"equal"} and len(equal_only) == 2 + 1 + 2 + 4


@pytest.mark.parametrize("change, message", [
    (dict(budgets=("authors", "control")), "budgets must include 'equal'"),
    (dict(budgets=("equal", "authors")), "'authors' and 'control' go together"),
    (dict(budgets=("equal", "more")), r"budgets: unknown arm\(s\) \['more'\]"),
    (dict(epochs=5), r"outer_iterations x inner_epochs = 2 x 2 must equal epochs=5"),
    (dict(alphas=(0.0,)), r"alphas: \[0.0\]"),
    (dict(authors_budgets={"anchored_logit": (3, 5, 5)}),
     r"authors_budgets: no \(reference epochs, T, K\) for \['anchored_live'\]"),
    (dict(authors_budgets={"anchored_logit": (3, 0, 5), "anchored_live": (1, 1, 5)}),
     "authors_budgets: .*integers >= 1"),
])
def test_settings_name_what_is_inconsistent(change, message):
    with pytest.raises(ValueError, match=message):
        _settings(**change).check()


def test_authors_arm_relaxes_t_times_k_only_for_itself():
    # T x K = 25 != epochs = 4 is the authors arm's own budget, not an error
    _settings(authors_budgets={"anchored_logit": (3, 5, 5), "anchored_live": (1, 1, 5)}).check()


def test_an_intermediate_outer_iteration_is_a_sweep_point():
    """The matched rule chooses among lr x outer iteration; the note says when the chosen
    point is an intermediate checkpoint."""
    def point(series, lr, outer, domain, general, compute, seed=0):
        return {"method": series.split()[0], "series": series, "lr": lr, "outer": outer,
                "outers": None if outer is None else 3, "seed": seed, "domain": domain,
                "general": general, "compute": compute}

    points = [point("sft", 1e-3, None, 1.0, 0.1, 100), point("sft", 1e-4, None, 0.5, 0.6, 100),
              # outer 2 of 3 reaches the bar (0.9) with more general than outer 3
              point("anchored_logit", 1e-3, 1, 0.5, 0.7, 150),
              point("anchored_logit", 1e-3, 2, 0.92, 0.4, 200),
              point("anchored_logit", 1e-3, 3, 0.95, 0.2, 250)]
    summary = summarize(points, {"domain": 0.0, "general": 0.8})
    matched = summary["methods"]["anchored_logit"]
    assert (matched["lr"], matched["outer"], matched["compute"]) == (1e-3, 2, 200)
    assert matched["note"] == "an intermediate checkpoint: outer iteration 2 of 3"
    assert [r["outer"] for r in summary["sweep"]["anchored_logit"]] == [1, 2, 3]
    assert "note" not in summary["methods"]["sft"]
    general = next(v for v in summary["verdicts"] if v["verdict"].startswith("general"))
    assert general["outer"] == 2 and general["margin"] == pytest.approx(0.3)


# A tiny lab with every arm and two alphas: 1 optimizer step per epoch (32 examples, batch 32),
# 896 tokens per step (32 rows x 28 positions).
ARMS_TINY = dict(seeds=1, methods=("sft", "anchored_live"), general_train=128, general_eval=16,
                 domain_train=32, domain_eval=16, pretrain_epochs=1, epochs=2,
                 outer_iterations=2, inner_epochs=1, lrs=(1e-3,), low_lrs=(1e-4,),
                 reference_lr=1e-3, alphas=(0.5, 0.8), budgets=("equal", "authors", "control"),
                 authors_budgets={"anchored_live": (1, 3, 1)}, control_lrs=(1e-4,))
LAB_SCRIPT = r"""
import sys
from pathlib import Path
from nemo_anchored.lab.run import Lab
from nemo_anchored.lab.settings import LabSettings

if __name__ == "__main__":  # checkpoint saving starts processes that import this file
    Lab(Path(sys.argv[1]), LabSettings(**SETTINGS), log=lambda *a: None).run()
"""


@pytest.mark.slow
def test_tiny_lab_with_every_arm(tmp_path):
    script = tmp_path / "lab.py"
    script.write_text(LAB_SCRIPT.replace("**SETTINGS", f"**{ARMS_TINY!r}"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "lab")], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "lab"
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["budgets"] == ["equal", "authors", "control"]
    assert results["config"]["alphas"] == [0.5, 0.8]
    # Hand-counted compute in units of P = 896 token passes (forward + 2 x backward):
    #   sft, 2 steps:                      2P fwd, 2P bwd               -> 6P
    #   equal live after t of 2 steps:     2tP + reference's 2P fwd, tP + 2P bwd -> (4t + 6)P
    #   authors live after t of 3 steps:   2tP + reference's 1P fwd, tP + 1P bwd -> (4t + 3)P
    #   control sft, 3 epochs:             3P fwd, 3P bwd               -> 9P
    P = 896
    expected = {("sft", None): 6, ("sft control3ep", None): 9}
    for alpha in ("0.5", "0.8"):
        expected |= {(f"anchored_live a{alpha}", t): 4 * t + 6 for t in (1, 2)}
        expected |= {(f"anchored_live a{alpha} authors", t): 4 * t + 3 for t in (1, 2, 3)}
    found = {(p["series"], p["outer"]): p["compute"] for p in results["points"]}
    assert found == {key: n * P for key, n in expected.items()}
    # the authors arm's 1-epoch reference is a training, not a point; both arms' references ran
    runs = sorted(p.parent.relative_to(out / "runs").as_posix()
                  for p in out.glob("runs/**/scores.json"))
    assert runs == ["pretrain", "seed1000/anchored_live_a0.5_lr0.001",
                    "seed1000/anchored_live_a0.8_lr0.001",
                    "seed1000/authors/anchored_live_a0.5_lr0.001",
                    "seed1000/authors/anchored_live_a0.8_lr0.001",
                    "seed1000/control_e3/sft_lr0.0001", "seed1000/reference_e1_lr0.001",
                    "seed1000/sft_lr0.001"]
    authors = json.loads((out / "runs/seed1000/authors/anchored_live_a0.5_lr0.001/scores.json")
                         .read_text())["identity"]
    assert authors["model"]["reference_checkpoint"].endswith("reference_e1_lr0.001/final")
    assert (authors["anchor"]["outer_iterations"], authors["anchor"]["alpha"]) == (3, 0.5)
    assert set(results["methods"]) == {"base"} | {series for series, _ in expected}
    details = {d["run"]: d for d in results["point_details"]}
    assert details["seed1000/control_e3/sft_lr0.0001"]["compute_passes"] == {
        "forward": 3 * P, "backward": 3 * P, "forward_equivalent": 9 * P}
    assert (out / "pareto.png").stat().st_size > 1000
    assert "| anchored_live a0.8 authors | 0.001 | 3/3 |" in (out / "results.md").read_text()
    # the authors arm's reference is scored and reported (the ceiling of the runs toward it)
    (reference,) = results["references"]
    assert (reference["run"], reference["epochs"]) == ("seed1000/reference_e1_lr0.001", 1)
    assert 0 <= reference["domain"] <= 1 and 0 <= reference["general"] <= 1
    assert reference["kl_to_base_general"] > 0
    assert reference["compute_passes"] == {"forward": P, "backward": P, "forward_equivalent": 3 * P}
    assert "| 1 | 0.001 |" in (out / "results.md").read_text()
