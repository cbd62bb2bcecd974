"""nemo-anchored lab: task generators, greedy decoding, the matched-domain rule and how close its
verdicts are, results.json, shared trainings, resuming a killed lab.

Model work runs in subprocesses (as tests/test_training.py does): megatron's CPU shims and the
process group stay out of the pytest process.
"""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_anchored.lab.records import RUN_RECORD, LabResumeError, read_run, write_run
from nemo_anchored.lab.report import markdown_table, verdict_lines
from nemo_anchored.lab.settings import LAB_METHODS, SUMMARY_METHODS
from nemo_anchored.lab.summary import matched_point, pareto_frontier, summarize, sweep_table
from nemo_anchored.lab.tasks import GENERAL_TASKS, make_splits
from tests.launch import children, outlives

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


# ------------------------------------------------------------------------------ task generators

def _solve(example):
    """Independent answers from the prompt text alone."""
    p = example["prompt"]
    if m := re.fullmatch(r"add (\d+)\+(\d+)=", p):
        return [str(int(m[1]) + int(m[2]))]
    if m := re.fullmatch(r"get ((?:[a-z]\d)+) ([a-z])=", p):
        table = dict(re.findall(r"([a-z])(\d)", m[1]))
        assert len(table) == len(m[1]) // 2  # distinct keys: one answer
        return [table[m[2]]]
    if m := re.fullmatch(r"rev ([a-z]+)=", p):
        return ["".join(reversed(m[1]))]
    if m := re.fullmatch(r"srt ([a-z]+)=", p):
        return ["".join(sorted(m[1]))]
    if m := re.fullmatch(r"cd (\d+)\?(\d+)=(-?\d+)", p):
        a, b, t = int(m[1]), int(m[2]), int(m[3])
        return [op for op, f in (("+", lambda: a + b), ("-", lambda: a - b),
                                 ("*", lambda: a * b)) if f() == t]
    # domain: v=d;...;w=x<op>y;...;z?
    *assignments, question = p.split(";")
    assert question.endswith("?")
    env = {}
    for item in assignments:
        name, expr = item.split("=")
        m = re.fullmatch(r"([a-z]|\d)(?:([-+*])([a-z]|\d))?", expr)
        assert m, item
        val = lambda tok: env[tok] if tok.isalpha() else int(tok)  # noqa: E731
        if m[2] is None:
            env[name] = val(m[1])
        else:
            x, y = val(m[1]), val(m[3])
            env[name] = {"+": x + y, "-": x - y, "*": x * y}[m[2]] % 10
    return [str(env[question[:-1]])]


@pytest.mark.parametrize("kind", ["general", "domain"])
def test_splits_are_deterministic_correct_and_disjoint(kind):
    a = make_splits(kind, 400, 100, seed=3)
    assert a == make_splits(kind, 400, 100, seed=3)
    assert a != make_splits(kind, 400, 100, seed=4)
    assert len(a["train"]) == 400 and len(a["eval"]) == 100
    train = {e["prompt"] for e in a["train"]}
    held_out = {e["prompt"] for e in a["eval"]}
    assert len(train) == 400 and len(held_out) == 100  # distinct within each split
    assert not train & held_out
    for example in a["train"] + a["eval"]:
        answers = _solve(example)
        assert answers == [example["response"]], example  # exactly one, the stored one
    tasks = {e["task"] for e in a["train"]}
    assert tasks == (set(GENERAL_TASKS) if kind == "general" else {"domain"})
    if kind == "general":  # an even mix
        counts = [sum(e["task"] == t for e in a["train"]) for t in GENERAL_TASKS]
        assert max(counts) - min(counts) <= 1


def test_domain_is_a_chain_asking_its_last_variable():
    domain = make_splits("domain", 300, 50, seed=1)
    steps = set()
    for e in domain["train"] + domain["eval"]:
        *assignments, question = e["prompt"].split(";")
        names = [a.split("=")[0] for a in assignments]
        assert len(set(names)) == len(names) and question == names[-1] + "?"
        for prev, item in zip(names, assignments[1:]):
            assert re.fullmatch(rf"[a-z]={prev}\+1", item), e
        steps.add(len(assignments) - 1)
    assert steps == {1, 2, 3}
    # every example fits the lab's sequence length (bos + prompt + response + eos <= 28)
    assert max(len(e["prompt"]) + len(e["response"]) + 2 for e in domain["train"]) <= 28


def test_domain_format_differs_from_general():
    general = make_splits("general", 40, 8, seed=0)["train"]
    domain = make_splits("domain", 40, 8, seed=0)["train"]
    assert all(e["prompt"].endswith("?") and ";" in e["prompt"] for e in domain)
    assert not any("?" in e["prompt"][-1] or ";" in e["prompt"] for e in general)


# --------------------------------------------------------------------------- matched-domain rule

def _points(table):
    """{method: {lr: [(domain, general), ...per seed]}} -> points"""
    return [{"method": m, "lr": lr, "seed": s, "domain": d, "general": g}
            for m, by_lr in table.items() for lr, runs in by_lr.items()
            for s, (d, g) in enumerate(runs)]


def test_matched_domain_rule_by_hand():
    points = _points({
        # sft seed means: lr 1e-4 (0.2, 0.8), 1e-3 (0.8, 0.4), 3e-3 (1.0, 0.1): best 1.0 -> 0.9
        "sft": {1e-4: [(0.2, 0.8), (0.2, 0.8)], 1e-3: [(0.7, 0.5), (0.9, 0.3)],
                3e-3: [(1.0, 0.0), (1.0, 0.2)]},
        # anchored: 1e-3 reaches 0.9 exactly (0.85, 0.95) with general 0.6; 3e-3 0.95 / 0.5
        "anchored_logit": {1e-4: [(0.5, 0.9), (0.5, 0.9)], 1e-3: [(0.85, 0.7), (0.95, 0.5)],
                           3e-3: [(0.95, 0.5), (0.95, 0.5)]},
        # low_sft never reaches 0.9
        "low_sft": {1e-5: [(0.0, 0.9), (0.1, 0.9)], 1e-4: [(0.6, 0.7), (0.8, 0.7)]},
    })
    summary = summarize(points, {"domain": 0.0, "general": 0.85})
    assert summary["best_sft_domain"] == pytest.approx(1.0)
    assert summary["matched_domain_threshold"] == pytest.approx(0.9)
    m = summary["methods"]
    assert m["base"]["domain"] == 0.0 and m["base"]["general"] == 0.85
    assert m["sft"]["lr"] == 3e-3
    assert m["sft"]["domain"] == pytest.approx(1.0) and m["sft"]["general"] == pytest.approx(0.1)
    assert m["sft"]["general_std"] == pytest.approx(0.1414213562)  # sample std of 0.0, 0.2
    assert m["anchored_logit"]["lr"] == 1e-3  # general 0.6 beats 0.5 at 3e-3
    assert m["anchored_logit"]["domain"] == pytest.approx(0.9)
    assert m["anchored_logit"]["general"] == pytest.approx(0.6)
    assert m["anchored_logit"]["domain_std"] == pytest.approx(0.0707106781)
    low = m["low_sft"]
    assert low["domain"] is None and low["general"] is None and low["lr"] is None
    assert "no learning rate reaches" in low["note"] and "0.700" in low["note"]
    table = markdown_table(summary)
    assert "| low_sft | - | - | n/a | n/a | - | no learning rate reaches" in table
    assert "| anchored_logit | 0.001 | - | 0.900 ± 0.071 | 0.600 ± 0.141 | - |" in table
    # How close each verdict is: the bar is 0.9 x sft's best point (1.0 ± 0.0 at 3e-3).
    verdicts = {(v["method"], v["verdict"]): v for v in summary["verdicts"]}
    reach = verdicts["anchored_logit", "reaches the matched domain"]
    assert reach["margin"] == pytest.approx(0.0, abs=1e-12)  # 0.9 against the bar 0.9
    assert reach["spread"] == pytest.approx(0.0707106781) and reach["within_noise"]
    general = verdicts["anchored_logit", "general vs sft at matched domain"]
    assert general["margin"] == pytest.approx(0.5)  # 0.6 against sft's 0.1 at 3e-3
    assert general["spread"] == pytest.approx(0.2)  # hypot(0.1414, 0.1414)
    assert not general["within_noise"]
    miss = verdicts["low_sft", "misses the matched domain"]  # its best domain: 0.7 at 1e-4
    assert (miss["lr"], miss["seeds"]) == (1e-4, 2)
    assert miss["margin"] == pytest.approx(-0.2) and miss["spread"] == pytest.approx(0.1414214)
    assert set(verdicts) == {("anchored_logit", "reaches the matched domain"),
                             ("anchored_logit", "general vs sft at matched domain"),
                             ("low_sft", "misses the matched domain")}
    lines = verdict_lines(summary)
    assert ("| anchored_logit | general vs sft at matched domain | 0.001 | - | 0.600 ± 0.141 | "
            "sft 0.100 ± 0.141 | +0.500 | 0.200 | beyond the spread |") in lines
    assert "| 0.900 ± 0.071 | bar 0.900 ± 0.000 | " in lines and "within noise" in lines
    one_seed = summarize([p for p in points if p["seed"] == 0], {"domain": 0.0, "general": 0.8})
    assert all(v["within_noise"] is None for v in one_seed["verdicts"])
    assert "1 seed: no spread" in verdict_lines(one_seed)


def test_sweep_and_frontier():
    rows = sweep_table(_points({"dft": {3e-3: [(0.5, 0.5)], 1e-3: [(0.2, 0.9)],
                                        1e-2: [(0.4, 0.4)]}}))["dft"]
    assert [r["lr"] for r in rows] == [1e-3, 3e-3, 1e-2]
    assert rows[0]["domain_std"] == 0.0 and rows[0]["seeds"] == 1
    assert [r["lr"] for r in pareto_frontier(rows)] == [1e-3, 3e-3]  # (0.4, 0.4) dominated
    assert matched_point(rows, 0.45, seeds=1)["lr"] == 3e-3


def test_points_with_failed_seeds_set_no_bar_and_match_nothing():
    # sft's 3e-3 and dft's 3e-3 kept one seed of three (the others diverged): the mean of the
    # survivor would set the bar (1.0) and let dft reach it on one lucky seed.
    points = _points({
        "sft": {1e-3: [(0.85, 0.2)] * 3, 3e-3: [(1.0, 0.05)]},
        "kl_sft": {1e-3: [(0.86, 0.3)] * 3},
        "dft": {1e-3: [(0.5, 0.5)] * 3, 3e-3: [(0.95, 0.4)]},
    })
    summary = summarize(points, {"domain": 0.0, "general": 0.8})
    assert summary["best_sft_domain"] == pytest.approx(0.85)  # the 3-seed point's
    m = summary["methods"]
    assert (m["sft"]["lr"], m["kl_sft"]["lr"]) == (1e-3, 1e-3)
    assert m["sft"]["note"] == "left out, some of their 3 seeds failed: lr 0.003 (1 of 3)"
    assert m["dft"]["lr"] is None
    assert m["dft"]["note"].startswith("no learning rate reaches the matched domain accuracy "
                                       "0.765 (best seed-mean domain: 0.500); left out")
    verdicts = {(v["method"], v["verdict"]): v for v in summary["verdicts"]}
    assert verdicts["dft", "misses the matched domain"]["lr"] == 1e-3


# -------------------------------------------------------------------------------- model work

def _run(script, timeout=120):
    result = subprocess.run([PYTHON, "-c", script], env=ENV, cwd=ROOT, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


GENERATE_SCRIPT = r"""
import json, torch
from nemo_anchored.data import ByteTokenizer
from nemo_anchored.eval.generate import exact_match, greedy_generate
from nemo_anchored.config import GPTConfig
from nemo_anchored.models.gpt import build_gpt_model
from nemo_anchored.parallel.distributed import model_parallel

tok = ByteTokenizer()
PADDED = 384  # 259 rounded up to a multiple of 128

class Scripted(torch.nn.Module):
    # Logits that prefer a padded column above all, then a scripted token per position.
    def __init__(self, script):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script = script
    def forward(self, tokens, positions, mask, inference_context=None, **kwargs):
        b, s = tokens.shape
        length = int(positions[0, -1]) + 1  # the sequence so far (KV-cached steps see one token)
        logits = torch.zeros(b, s, PADDED)
        logits[..., 300] = 100.0  # a padded id: must never be chosen
        nxt = self.script[min(length, len(self.script) - 1)]
        logits[..., nxt] = 50.0
        return logits

out = {}
with model_parallel(1, 1, seed=0):
    # prompt "ab" -> [bos, a, b] (length 3): emits script[3], script[4], ... until eos
    a, b, c = (ord(x) for x in "xyz")
    m = Scripted([0, 0, 0, a, b, tok.eos_id, c, c, c, c, c, c, c, c, c, c, c, c])
    out["eos"] = greedy_generate(m, tok, ["ab"], max_new_tokens=10)
    out["max"] = greedy_generate(m, tok, ["abcd"], max_new_tokens=3)  # 5 tokens: eos first
    out["em"] = exact_match(m, tok, [{"prompt": "ab", "response": "xy"},
                                     {"prompt": "cd", "response": "xz"}])
    cfg = GPTConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=259,
                    max_seq_len=64, make_vocab_size_divisible_by=128)
    model = build_gpt_model(cfg)
    with torch.no_grad():  # make the padded rows of the tied embedding dominate
        model.embedding.word_embeddings.weight[259:] *= 1000.0
    prompts = ["add 3+4=", "rev ab=", "x=1;y=2;y?", "cd 2?3=6"]
    gens = greedy_generate(model, tok, prompts, max_new_tokens=7, batch_size=2)
    out["real_lengths"] = [len(g) for g in gens]
    out["real_max_id"] = max([i for g in gens for i in g] + [0])
    out["again"] = gens == greedy_generate(model, tok, prompts, max_new_tokens=7)
    out["training_restored"] = model.training
print(json.dumps(out))
"""


@pytest.mark.slow
def test_greedy_generation_stops_and_masks_padded_vocab():
    out = _run(GENERATE_SCRIPT)
    assert out["eos"] == [[ord("x"), ord("y")]]  # stopped at eos, eos not included
    # "abcd" -> 5 tokens: script[5] = eos at once
    assert out["max"] == [[]]
    assert out["em"] == 0.5
    assert all(n <= 7 for n in out["real_lengths"])
    assert out["real_max_id"] < 259
    assert out["again"] and out["training_restored"]


@pytest.mark.slow
def test_max_new_tokens_cap():
    script = GENERATE_SCRIPT.replace(
        'out["max"] = greedy_generate(m, tok, ["abcd"], max_new_tokens=3)',
        'out["max"] = greedy_generate(Scripted([0] * 4 + [ord("q")] * 40), tok, ["abc"], '
        'max_new_tokens=3)')
    assert _run(script)["max"] == [[ord("q")] * 3]


# low_sft at 1e-4 is sft's training at 1e-4 (the same objective): 5 points from 4 fine-tunings.
TINY = dict(seeds=1, methods=("sft", "low_sft", "anchored_logit"), general_train=128,
            general_eval=16, domain_train=32, domain_eval=16, pretrain_epochs=1, epochs=2,
            outer_iterations=2, inner_epochs=1, lrs=(1e-4, 1e-3), low_lrs=(1e-4,),
            reference_lr=1e-3)
LAB_SCRIPT = r"""
import json, sys
from pathlib import Path
from nemo_anchored.lab.run import Lab
from nemo_anchored.lab.settings import LabSettings

def main():
    # argv: OUT [jobs [settings changed from TINY, as JSON]]
    s = LabSettings(**{**TINY, **(json.loads(sys.argv[3]) if len(sys.argv) > 3 else {})})
    jobs = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    Lab(Path(sys.argv[1]), s, log=print, jobs=jobs).run()
    print(json.dumps({"ok": True}))

if __name__ == "__main__":
    main()
"""


@pytest.fixture(scope="module")
def tiny_labs(tmp_path_factory):
    """The tiny lab, run twice with the same settings and seeds (at the same time): in one
    process, and with its fine-tunings in 2 worker processes (jobs=2)."""
    tmp = tmp_path_factory.mktemp("lab")
    script = tmp / "lab.py"
    script.write_text(LAB_SCRIPT.replace("**TINY", f"**{TINY!r}"))
    outs = [tmp / "a", tmp / "b"]
    procs = [subprocess.Popen([PYTHON, str(script), str(out), str(jobs)], env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for out, jobs in zip(outs, (1, 2))]
    for proc, out in zip(procs, outs):
        said, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-4000:]
        (tmp / f"{out.name}.log").write_text(said)
    return outs


@pytest.mark.slow
def test_tiny_lab_end_to_end(tiny_labs):
    out = tiny_labs[0]
    results = json.loads((out / "results.json").read_text())
    assert {"points", "methods", "config"} <= set(results)
    # sft at 2 lrs, low_sft at 1, anchored_logit at 2 lrs x its 2 outer iterations
    assert len(results["points"]) == 7
    for p in results["points"]:
        assert set(p) == {"method", "series", "arm", "alpha", "lr", "outer", "outers", "seed",
                          "domain", "general", "compute"}
        assert p["method"] in LAB_METHODS and 0 <= p["domain"] <= 1 and 0 <= p["general"] <= 1
        assert p["series"] == p["method"] and p["arm"] == "equal"
    assert sorted((p["lr"], p["outer"]) for p in results["points"]
                  if p["method"] == "anchored_logit") == [(1e-4, 1), (1e-4, 2), (1e-3, 1),
                                                          (1e-3, 2)]
    assert set(results["methods"]) == {"base", "sft", "low_sft", "anchored_logit"}
    assert set(results["methods"]) <= set(SUMMARY_METHODS)
    for entry in results["methods"].values():
        assert {"domain", "general", "domain_std", "general_std"} <= set(entry)
    assert "data_budget" in results["config"] and results["config"]["settings"]["seeds"] == 1
    assert (out / "pareto.png").stat().st_size > 1000
    assert (out / "pareto.pdf").read_bytes().startswith(b"%PDF")
    # low_sft at 1e-4 shares sft's training: one record, one run directory, equal scores
    runs = {d["method"]: d["run"] for d in results["point_details"] if d["lr"] == 1e-4}
    assert runs["low_sft"] == runs["sft"] == "seed1000/sft_lr0.0001"
    low, sft = ([p for p in results["points"] if (p["method"], p["lr"]) == (m, 1e-4)]
                for m in ("low_sft", "sft"))
    assert [(p["domain"], p["general"]) for p in low] == [(p["domain"], p["general"])
                                                          for p in sft]
    assert sorted(p.parent.name for p in out.glob(f"runs/**/{RUN_RECORD}")) == [
        "anchored_logit_lr0.0001", "anchored_logit_lr0.001", "pretrain", "sft_lr0.0001",
        "sft_lr0.001"]
    assert re.search(r"\| anchored_logit \| (reaches|misses) the matched domain \| 0\.00",
                     (out / "results.md").read_text())
    for split in ("general_train", "general_eval", "domain_train", "domain_eval"):
        assert (out / "data" / f"{split}.jsonl").is_file()
    # KL to p_base: zero for the base itself, positive after fine-tuning; anchored runs carry
    # one evaluation per outer iteration, the last one being the final model's.
    assert results["base"]["kl_to_base_general"] == pytest.approx(0.0, abs=1e-12)
    for d in results["point_details"]:
        assert d["kl_to_base_general"] > 0
        if d["method"] == "anchored_logit":
            assert [t["outer"] for t in d["trace"]] == [0, 1]
            last = d["trace"][-1]
            assert (last["domain"], last["general"]) == (d["domain"], d["general"])
            assert last["kl_to_base_general"] == pytest.approx(d["kl_to_base_general"])
        else:
            assert "trace" not in d
    assert "| anchored_logit | 0.001 | 2 |" in (out / "results.md").read_text()


@pytest.mark.slow
def test_same_seed_same_results_in_one_process_or_in_workers(tiny_labs):
    a, b = (json.loads((out / "results.json").read_text()) for out in tiny_labs)
    assert a["points"] == b["points"] and a["base"] == b["base"]
    assert a["point_details"] == b["point_details"]
    assert (a["config"]["jobs"], b["config"]["jobs"]) == (1, 2)
    said = [(tiny_labs[0].parent / f"{name}.log").read_text() for name in ("a", "b")]
    assert "in worker processes" not in said[0]
    assert "lab: 4 trainings, 2 at a time in worker processes" in said[1]


def _comparable(out: Path) -> dict:
    """results.json without what differs between labs that computed the same thing: the
    wall and per-training times, the trainings run at a time, the OUT path inside recorded
    paths, and the base's files but for its weights (each lab pretrains its own: lab/base.py's
    weight_digests)."""
    from nemo_anchored.lab.base import weight_digests

    results = json.loads((out / "results.json").read_text().replace(str(out), "OUT"))
    results["config"]["run_time_s"] = sorted(results["config"]["run_time_s"])
    results["config"]["base_sha256"] = weight_digests(results["config"]["base_sha256"])
    del results["config"]["wall_time_s"], results["config"]["jobs"]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_killed_lab_continues_to_the_same_results(tiny_labs, tmp_path, jobs):
    """SIGKILL once two fine-tunings are recorded, then the same command again: the same
    results.json as the uninterrupted lab, without running the recorded trainings again. No
    process the killed lab started (its worker processes with jobs=2) outlives it."""
    out = tmp_path / "lab"
    command = [PYTHON, str(tiny_labs[0].parent / "lab.py"), str(out), str(jobs)]
    with open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=stderr)
        deadline = time.monotonic() + 600  # a hang guard, not a speed check
        while len(list(out.glob(f"runs/seed1000/*/{RUN_RECORD}"))) < 2:
            assert proc.poll() is None, (tmp_path / "stderr").read_text()[-4000:]
            assert time.monotonic() < deadline, "the lab recorded no trainings"
            time.sleep(0.05)
        started = children(proc.pid)
        proc.kill()
        proc.wait()
    if jobs > 1:
        assert len(started) >= jobs  # the workers (and multiprocessing's resource tracker)
    assert not outlives(started), started
    assert not (out / "results.json").exists()  # killed before the end
    kept = {p: p.stat().st_mtime_ns for p in out.glob(f"runs/**/{RUN_RECORD}")}
    assert 3 <= len(kept) < 5  # the pretraining and two or three fine-tunings, not all four
    result = subprocess.run(command, env=ENV, cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert _comparable(out) == _comparable(tiny_labs[0])
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # read back, not trained again


@pytest.mark.slow
def test_lab_refuses_to_continue_with_other_settings(tiny_labs):
    from nemo_anchored.lab.run import Lab
    from nemo_anchored.lab.settings import LabSettings

    changed = LabSettings(**{**TINY, "seeds": 2, "alphas": (0.25,)})
    with pytest.raises(LabResumeError, match=r"\(settings\.alphas: \[0\.5\] then, \[0\.25\] now; "
                       r"settings\.seeds: 1 then, 2 now\)"):
        Lab(tiny_labs[0], changed, log=lambda *a: None).run()


@pytest.fixture(scope="module")
def sharded_labs(tiny_labs):
    """The tiny lab with 2 seeds, run whole (jobs=2) and as two shards of one seed each (at the
    same time; each pretrains its own base, deterministically the same), and the shards
    merged: (whole, [shard0, shard1], merged)."""
    from nemo_anchored.lab.shards import merge_shards

    tmp = tiny_labs[0].parent
    runs = {"whole": (2, {"seeds": 2}), "shard0": (1, {"seeds": 2, "seed_indices": [0]}),
            "shard1": (1, {"seeds": 2, "seed_indices": [1]})}
    procs = {name: subprocess.Popen([PYTHON, str(tmp / "lab.py"), str(tmp / name), str(jobs),
                                     json.dumps(changed)], env=ENV, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, (jobs, changed) in runs.items()}
    for proc in procs.values():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]
    shards = [tmp / "shard0", tmp / "shard1"]
    merge_shards(tmp / "merged", shards[::-1], log=lambda *a: None)  # any order
    return tmp / "whole", shards, tmp / "merged"


@pytest.mark.slow
def test_merged_shards_equal_the_whole_lab(sharded_labs):
    """Two one-seed shards, merged: the same points, scores, summary and verdicts as the lab
    that ran both seeds in one go; the config says where each seed ran."""
    from nemo_anchored.lab.base import weight_digests

    whole_dir, shards, merged_dir = sharded_labs
    whole, merged = (json.loads((d / "results.json").read_text()) for d in sharded_labs[::2])
    shard_results = [json.loads((d / "results.json").read_text()) for d in shards]
    assert [r["config"]["seeds"] for r in shard_results] == [[1000], [1001]]
    assert {p["seed"] for p in whole["points"]} == {1000, 1001}
    assert {k: v for k, v in merged.items() if k != "config"} == \
        {k: v for k, v in whole.items() if k != "config"}
    for key in ("settings", "seeds", "data_budget", "budgets", "alphas"):
        assert merged["config"][key] == whole["config"][key], key
    assert weight_digests(merged["config"]["base_sha256"]) == \
        weight_digests(whole["config"]["base_sha256"])  # each lab pretrained its own
    assert [(s["dir"], s["seeds"]) for s in merged["config"]["shards"]] == [
        (str(shards[0]), [1000]), (str(shards[1]), [1001])]
    assert sorted(merged["config"]["run_time_s"]) == sorted(whole["config"]["run_time_s"])
    assert (merged_dir / "results.md").read_text() == (whole_dir / "results.md").read_text()
    assert (merged_dir / "pareto.png").stat().st_size > 1000


@pytest.mark.slow
def test_merge_refuses_what_is_not_one_lab(sharded_labs, tmp_path):
    from nemo_anchored.lab.shards import ShardMergeError, merge_shards

    _, (shard0, shard1), _ = sharded_labs

    def edited(source: Path, name: str, edit) -> Path:
        results = json.loads((source / "results.json").read_text())
        edit(results["config"])
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        return tmp_path / name

    def merge(*shards):
        merge_shards(tmp_path / "merged", shards, log=lambda *a: None)

    with pytest.raises(ShardMergeError, match=r"in two shards: \[1000\]"):
        merge(shard0, shard0, shard1)
    with pytest.raises(ShardMergeError, match=r"in none: \[1000\] \(run the shard with "
                       r"--seed-index 0\)"):
        merge(shard1)
    other = edited(shard1, "epochs", lambda c: c["settings"].update(epochs=3))
    with pytest.raises(ShardMergeError, match=r"other settings .*; epochs: 2 then, 3 now\)"):
        merge(shard0, other)
    other = edited(shard1, "base", lambda c: c["base_sha256"].update({"x.distcp": "0" * 64}))
    with pytest.raises(ShardMergeError, match="another p_base"):
        merge(shard0, other)
    (tmp_path / "unfinished").mkdir()
    with pytest.raises(ShardMergeError, match="unfinished: no results.json"):
        merge(shard0, tmp_path / "unfinished")
    assert not (tmp_path / "merged").exists()


def test_merge_orders_interleaved_shards_as_the_whole_lab(tmp_path):
    """Shards of seeds {1000, 1002} and {1001}, given in any order: every list, and the run
    times, seed by seed as the whole lab writes them (hand-made results)."""
    from nemo_anchored.lab.shards import merge_shards

    def shard(name, seeds):
        points = [{"method": "sft", "series": "sft", "arm": "equal", "alpha": None, "lr": lr,
                   "seed": seed, "outer": None, "outers": None, "domain": 0.5 + lr,
                   "general": 0.5 - lr, "compute": 1.0} for seed in seeds for lr in (0.1, 0.2)]
        config = {"seeds": seeds, "settings": {"seeds": 3, "seed_indices": [s - 1000 for s in
                                                                             seeds]},
                  "base_sha256": {"w.distcp": "0" * 64}, "machine": name, "wall_time_s": 1.0,
                  "jobs": 1, "run_time_s": {f"seed{s}/sft_lr{lr}": 1.0 for s in seeds
                                            for lr in (0.1, 0.2)}}
        results = {"points": points, "point_details": [{**p, "run": "x"} for p in points],
                   "references": [], "failed_runs": [{"run": f"seed{s}/dft", "error": "e"}
                                                     for s in seeds],
                   "base": {"domain": 0.0, "general": 0.6}, "config": config}
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
        return tmp_path / name

    shards = [shard("odd", [1001]), shard("even", [1000, 1002])]
    merged = merge_shards(tmp_path / "merged", shards, log=lambda *a: None)
    order = [1000, 1000, 1001, 1001, 1002, 1002]
    assert [p["seed"] for p in merged["points"]] == order
    assert [p["seed"] for p in merged["point_details"]] == order
    assert [f["run"] for f in merged["failed_runs"]] == [f"seed{s}/dft" for s in order[::2]]
    assert [name.split("/")[0] for name in merged["config"]["run_time_s"]] == [
        f"seed{s}" for s in order]
    assert [s["seeds"] for s in merged["config"]["shards"]] == [[1000, 1002], [1001]]
    assert json.loads((tmp_path / "merged" / "results.json").read_text()) == \
        json.loads(json.dumps(merged))
    # The failed trainings are listed in results.md: a method whose every run failed has no
    # row in the summary, and would otherwise be indistinguishable from one never run.
    report = (tmp_path / "merged" / "results.md").read_text()
    assert "| training | error |\n|---|---|\n| seed1000/dft | e |\n| seed1001/dft | e |\n" \
           "| seed1002/dft | e |" in report


@pytest.mark.parametrize("indices, seeds", [((), 2), ((0, 0), 2), ((2,), 2), ((-1,), 2)])
def test_seed_indices_name_distinct_seeds_of_the_lab(indices, seeds):
    from nemo_anchored.lab.settings import LabSettings

    with pytest.raises(ValueError, match=r"seed_indices .*: distinct indices of the 2 seeds"):
        LabSettings(seeds=seeds, seed_indices=indices).check()
    assert LabSettings(seeds=3, seed_indices=(2, 0)).seed_values() == [1000, 1002]


def test_run_record_belongs_to_one_training_config(tmp_path):
    identity = {"method": "CrossEntropy", "optim": {"lr": 1e-3, "weight_decay": 0.0}}
    assert read_run(tmp_path, identity) is None  # not finished
    write_run(tmp_path, identity, {"scores": {"domain": 0.5}, "time_s": 1.0})
    assert read_run(tmp_path, identity)["scores"] == {"domain": 0.5}
    other = {"method": "CrossEntropy", "optim": {"lr": 1e-3, "weight_decay": 0.01}}
    with pytest.raises(LabResumeError, match=r"optim\.weight_decay: 0\.0 then, 0\.01 now"):
        read_run(tmp_path, other)


def test_committed_bases_match_their_settings_and_their_checksums(tmp_path):
    from nemo_anchored.lab.base import (CommittedBaseError, pretrain_fingerprint,
                                        verified_committed_base)
    from nemo_anchored.lab.settings import COMMITTED_BASES, DEMO, FULL, QUICK, RECIPE

    # The demo must not pretrain, and every shard of the full lab must start from the same
    # base: regenerate after any change (the command is in each base.json).
    COMMITTED_BASE, full_base = COMMITTED_BASES
    for folder, settings in ((COMMITTED_BASE, QUICK), (COMMITTED_BASE, DEMO), (full_base, FULL)):
        found = verified_committed_base(folder, pretrain_fingerprint(RECIPE, settings))
        assert found == folder / "checkpoint"
    assert verified_committed_base(full_base, pretrain_fingerprint(RECIPE, QUICK)) is None
    changed = dataclasses.replace(QUICK, pretrain_epochs=QUICK.pretrain_epochs + 1)
    assert verified_committed_base(COMMITTED_BASE, pretrain_fingerprint(RECIPE, changed)) is None
    copy = tmp_path / "lab_base"
    shutil.copytree(COMMITTED_BASE, copy)
    victim = next(p for p in sorted((copy / "checkpoint").iterdir()) if p.suffix == ".distcp")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(CommittedBaseError, match=f"{victim.name}: SHA-256 differs"):
        verified_committed_base(copy, pretrain_fingerprint(RECIPE, QUICK))
    victim.unlink()
    with pytest.raises(CommittedBaseError, match="differ from the recorded"):
        verified_committed_base(copy, pretrain_fingerprint(RECIPE, QUICK))


def test_mean_kl_against_a_direct_sum():
    import math

    import torch

    from nemo_anchored.eval.divergence import mean_kl

    gen = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), -1)
    logq = torch.log_softmax(torch.randn(2, 3, 5, generator=gen, dtype=torch.float64), -1)
    mask = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    direct = [sum(math.exp(a) * (a - b) for a, b in zip(logp[i, j].tolist(), logq[i, j].tolist()))
              for i, j in ((0, 0), (0, 2), (1, 2))]
    assert mean_kl(logp, logq, mask) == pytest.approx(sum(direct) / 3, rel=1e-12)
    assert mean_kl(logp, logp, mask) == 0.0
    with pytest.raises(ValueError, match="selects no position"):
        mean_kl(logp, logq, torch.zeros(2, 3))
