"""The lm-evaluation-harness tasks in nemo_anchored/eval/lm_eval_tasks/ agree with
`nemo-anchored eval` question by question, run as the README documents (offline, the chat
template applied) on SmolLM2-135M-Instruct as `convert mcore-to-hf` exported it (the shared
conversion run, conftest.py ``hf_conversions``)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "lm_eval", reason="lm-eval is not installed: pip install 'lm-eval[hf]==0.4.13' (the "
    "lm-eval extra) to compare its runs with `nemo-anchored eval`")

pytestmark = pytest.mark.slow  # the shared conversion run and an lm-eval process

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "nemo_anchored" / "eval" / "lm_eval_tasks"
MMLU_N, BUILT_N, MAX_NEW_TOKENS = 20, 2, 32
# lm-eval moves the prompt's trailing newline (the end of the chat template's generation prompt)
# into the answer, so each of its four log-likelihoods adds the same log p(newline | prompt); the
# four differences from ours must agree. Both run transformers' fp32 forward over differently
# padded batches: observed spread 3e-6 (a tiny random model, log-likelihoods near -22).
LOGPROB_TOL = 1e-4


def run_lm_eval(model: Path, data: dict, out: Path) -> dict:
    """The README's command; returns {task: [logged sample, ...]} in document order."""
    metadata = {"limit": MMLU_N, "seed": 0, **{task: str(path) for task, path in data.items()}}
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
               f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size", "8",
               "--include_path", str(TASKS_DIR), "--tasks",
               ",".join(f"nemo_anchored_{t}" for t in ["mmlu", *data]),
               "--apply_chat_template", "--gen_kwargs", f"max_gen_toks={MAX_NEW_TOKENS}",
               "--metadata", json.dumps(metadata), "--log_samples", "--output_path", str(out)]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    samples = {}
    for file in out.rglob("samples_nemo_anchored_*.jsonl"):
        task = file.name[len("samples_nemo_anchored_"):].rsplit("_", 1)[0]
        lines = [json.loads(line) for line in file.read_text().splitlines()]
        samples[task] = sorted(lines, key=lambda s: s["doc_id"])
    return samples


def test_lm_eval_agrees_with_nemo_anchored_eval_on_every_question(hf_conversions, tmp_path):
    """MMLU (20 questions): the same prediction and correctness, and four answer-letter
    log-likelihoods that differ from ours by one shared term (within LOGPROB_TOL);
    gsm_symbolic and medcalc (2 examples each, 32 new tokens): the same greedy response text
    and score."""
    from nemo_anchored.cli.main import main
    from nemo_anchored.data.builders import build

    work, _ = hf_conversions
    model = work / "export" / "smollm2"
    data = {}
    for task in ("gsm_symbolic", "medcalc"):
        data[task] = tmp_path / f"{task}.jsonl"
        data[task].write_text("".join(json.dumps(e) + "\n" for e in build(task, BUILT_N, 1)))
    ours_file = tmp_path / "nemo_anchored_eval.json"
    with pytest.raises(SystemExit) as exit_:  # the command's exit status
        main(["eval", "--hf", str(model), "--tasks", ",".join(["mmlu", *data]), "--limit",
              str(MMLU_N), "--seed", "0", "--max-new-tokens", str(MAX_NEW_TOKENS), "--out",
              str(ours_file), *[a for t, p in data.items() for a in ("--data", f"{t}={p}")]])
    assert exit_.value.code == 0
    ours = {task: result["examples"]
            for task, result in json.loads(ours_file.read_text())["tasks"].items()}
    theirs = run_lm_eval(model, data, tmp_path / "lm_eval_out")

    assert sorted(theirs) == sorted(ours) and len(theirs["mmlu"]) == MMLU_N
    for mine, sample in zip(ours["mmlu"], theirs["mmlu"], strict=True):
        loglikelihoods = [float(resp[0][0]) for resp in sample["resps"]]
        offsets = [a - b for a, b in zip(loglikelihoods, mine["logprobs"], strict=True)]
        assert max(offsets) - min(offsets) <= LOGPROB_TOL, (mine["index"], offsets)
        assert "ABCD"[sample["doc"]["answer"]] == mine["answer"]
        assert sample["acc"] == float(mine["correct"])
        assert "ABCD"[loglikelihoods.index(max(loglikelihoods))] == mine["prediction"]
    for task in data:
        assert len(theirs[task]) == BUILT_N
        for mine, sample in zip(ours[task], theirs[task], strict=True):
            assert sample["resps"][0][0] == mine["response"], task
            assert sample["acc"] == float(mine["correct"]), task
