"""Offline task builders: determinism, disjoint splits, the final-answer format, medcalc notes
checked against independently computed formulas, the `data build` command."""
import json
import random
import re
from fractions import Fraction

import pytest

from nemo_anchored.cli import data as data_command
from nemo_anchored.data import ByteTokenizer, load_sft_dataset
from nemo_anchored.data.builders import TASKS, build, build_splits, countdown_steps
from nemo_anchored.data.medcalc import MEDCALC_CALCULATORS, medcalc_example
from nemo_anchored.data.task_format import extract_final_answer, question_of
from nemo_anchored.eval.scoring import score_response

# Small sizes: countdown's generator searches expressions (~10-40 ms an example).
SIZES = {"gsm_symbolic": 60, "countdown": 12, "medcalc": 300}
CALCULATORS_BY_NAME = {c.name: c for c in MEDCALC_CALCULATORS}


@pytest.fixture(scope="module")
def examples():
    return {task: build(task, n, seed=5) for task, n in SIZES.items()}


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_prefix_stable_and_seeded(task, examples):
    n = SIZES[task]
    assert build(task, n, seed=5) == examples[task]
    assert build(task, n // 2, seed=5) == examples[task][:n // 2]
    other = build(task, n // 2, seed=6)
    # Another seed is another stream (reasoning-gym's own seeds would overlap, shifted by one).
    assert not {question_of(e) for e in other} & {question_of(e) for e in examples[task]}
    assert len({question_of(e) for e in examples[task]}) == n


@pytest.mark.parametrize("task", TASKS)
def test_examples_teach_the_final_answer_format_their_scorer_accepts(task, examples):
    for example in examples[task]:
        assert set(example) <= {"messages", "answer", "task", "metadata"}
        assert example["task"] == task
        user, assistant = example["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert "Answer: <" in user["content"]  # the instruction states the format
        last_line = assistant["content"].splitlines()[-1]
        assert last_line == f"Answer: {example['answer']}"
        assert extract_final_answer(assistant["content"]) == example["answer"]
        assert score_response(task, assistant["content"], example) == (example["answer"], True)
        if task == "gsm_symbolic":
            assert "####" not in assistant["content"]
            float(example["answer"])
        if task == "countdown":
            # The instruction says what is scored: every number, once.
            assert "using each number exactly once" in user["content"]
            numbers = example["metadata"]["numbers"]
            assert sorted(int(x) for x in re.findall(r"\d+", example["answer"])) == \
                sorted(numbers)
            assert Fraction(eval(example["answer"])) == example["metadata"]["target"]  # noqa: S307


def test_splits_are_disjoint_and_the_test_split_does_not_depend_on_n_train():
    train, test = build_splits("medcalc", 80, 30, seed=2)
    assert len(train) == 80 and len(test) == 30
    assert not {question_of(e) for e in train} & {question_of(e) for e in test}
    train_small, test_again = build_splits("medcalc", 10, 30, seed=2)
    assert test_again == test and train_small == train[:10]


def test_extract_final_answer():
    assert extract_final_answer("steps\nAnswer: 12\nmore\nAnswer:  7.5 kg \n") == "7.5 kg"
    assert extract_final_answer("no final line") is None
    assert extract_final_answer("The Answer: 3") is None  # must start its line
    assert extract_final_answer("Answer:") == ""
    assert extract_final_answer("Answer: 4\r\n") == "4"


def test_countdown_steps_follow_evaluation_order():
    steps, value = countdown_steps("42*(30 - 4 - 23)")
    assert steps == ["30 - 4 = 26", "26 - 23 = 3", "42 * 3 = 126"] and value == 126
    steps, value = countdown_steps("-59 + (23 + 89 + 66)/(1*1)")
    assert value == -59 + 178 and steps[-1] == "-59 + 178 = 119"
    steps, value = countdown_steps("7/2*4")
    assert steps == ["7 / 2 = 7/2", "7/2 * 4 = 14"] and value == 14
    with pytest.raises(ValueError, match="unsupported"):
        countdown_steps("2**3")


# ------------------------------------------------------------------------------- medcalc

def _note_values(example):
    """The note's "Label: value ..." lines as {label: text}."""
    note = question_of(example).split("Task:")[0]
    return dict(re.findall(r"^([A-Za-z][^:\n]*): (.+?)\.?$", note, re.MULTILINE))


def _kg(text):
    value, unit = text.split()
    return float(value) * (0.453592 if unit == "lbs" else 1.0)


def _metres(text):
    value, unit = text.split()
    return float(value) * (0.0254 if unit == "in" else 0.01)


def _yes(text):
    return {"yes": 1, "no": 0}[text]


# Formulas written from their definitions, applied to the values the note states.
def _bmi(v):
    return _kg(v["Weight"]) / _metres(v["Height"]) ** 2


def _map(v):
    systolic, diastolic = (float(x) for x in v["Blood pressure"].split()[0].split("/"))
    return (2 * diastolic + systolic) / 3


def _anion_gap(v):
    return sum(sign * float(v[k].split()[0]) for sign, k in
               ((1, "Sodium"), (-1, "Chloride"), (-1, "Bicarbonate")))


def _cha2ds2_vasc(v):
    age = int(v["Age"].split()[0])
    return ((2 if age >= 75 else 1 if age >= 65 else 0) + (v["Sex"] == "female")
            + _yes(v["Congestive heart failure"]) + _yes(v["Hypertension"])
            + 2 * max(_yes(v["Prior stroke"]), _yes(v["Prior transient ischemic attack"]),
                      _yes(v["Prior thromboembolism"]))
            + _yes(v["Vascular disease (prior myocardial infarction, peripheral artery disease "
                     "or aortic plaque)"]) + _yes(v["Diabetes mellitus"]))


_GCS = {"eyes open spontaneously": 4, "eye opening to verbal command": 3,
        "eye opening to pain": 2, "no eye opening": 1, "oriented": 5, "confused": 4,
        "inappropriate words": 3, "incomprehensible sounds": 2, "no verbal response": 1,
        "obeys commands": 6, "localizes pain": 5, "withdrawal from pain": 4,
        "flexion to pain": 3, "extension to pain": 2, "no motor response": 1}


def _gcs(v):
    return sum(_GCS[v[k]] for k in ("Best eye response", "Best verbal response",
                                     "Best motor response"))


INDEPENDENT = {"bmi": (_bmi, 0.01), "mean_arterial_pressure": (_map, 0.01),
               "anion_gap": (_anion_gap, 0.0), "cha2ds2_vasc": (_cha2ds2_vasc, 0.0),
               "glasgow_coma_scale": (_gcs, 0.0)}


@pytest.mark.parametrize("name", sorted(INDEPENDENT))
def test_medcalc_notes_state_the_inputs_of_the_answer(name):
    formula, tolerance = INDEPENDENT[name]
    for k in range(25):
        example = medcalc_example(CALCULATORS_BY_NAME[name], random.Random(k))
        want = formula(_note_values(example))
        assert float(example["answer"]) == pytest.approx(want, rel=tolerance, abs=1e-9), \
            question_of(example)


def test_every_calculator_runs_and_integer_outputs_are_integers(examples):
    assert len(MEDCALC_CALCULATORS) == len(CALCULATORS_BY_NAME) == 33
    for calculator in MEDCALC_CALCULATORS:
        for k in range(5):
            example = medcalc_example(calculator, random.Random(f"{calculator.name}{k}"))
            assert example["metadata"] == {"calculator": calculator.name,
                                           "output": calculator.output}
            if calculator.output == "integer":
                assert re.fullmatch(r"-?\d+", example["answer"]), example["answer"]
            # the solution is the calculator's own explanation, not a stub
            assert len(example["messages"][1]["content"]) > 80
    used = {e["metadata"]["calculator"] for e in examples["medcalc"]}
    assert len(used) >= 25  # a mix: the calculator is drawn per example


def test_unknown_task_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown task"):
        build("gsm8k", 3, 0)
    with pytest.raises(ValueError, match=">= 0"):
        build("medcalc", -1, 0)


# ---------------------------------------------------------------------------- the command

def _parse(argv):
    import argparse

    return data_command.add_arguments(argparse.ArgumentParser()).parse_args(argv)


def test_data_build_writes_disjoint_jsonl_the_sft_loader_reads(tmp_path, capsys):
    train_path, test_path = tmp_path / "d" / "train.jsonl", tmp_path / "d" / "test.jsonl"
    status = data_command.run(_parse(["build", "medcalc", "--n", "20", "--seed", "3", "--out",
                               str(train_path), "--test-n", "8", "--test-out", str(test_path)]))
    assert status == 0 and "20 training examples" in capsys.readouterr().out
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    test = [json.loads(line) for line in test_path.read_text().splitlines()]
    assert (train, test) == build_splits("medcalc", 20, 8, 3)
    assert not {question_of(e) for e in train} & {question_of(e) for e in test}
    dataset = load_sft_dataset(train_path, ByteTokenizer(), seq_length=4096)
    assert len(dataset) == 20


def test_data_build_rejects_inconsistent_arguments(tmp_path, capsys):
    out = str(tmp_path / "a.jsonl")
    assert data_command.run(_parse(["build", "countdown", "--n", "2", "--out", out,
                             "--test-n", "2"])) == 2
    assert "go together" in capsys.readouterr().err
    assert data_command.run(_parse(["build", "countdown", "--n", "2", "--out", out, "--test-n", "1",
                             "--test-out", out])) == 2
    assert data_command.run(_parse(["build", "countdown", "--n", "-2", "--out", out])) == 2
    assert not (tmp_path / "a.jsonl").exists()
    with pytest.raises(SystemExit):
        _parse(["build", "gsm8k", "--n", "2", "--out", out])
