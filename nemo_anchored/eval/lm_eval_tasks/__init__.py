"""lm-evaluation-harness task definitions for the benchmarks `nemo-anchored eval` scores: the YAML
files here (``nemo_anchored_mmlu``, ``nemo_anchored_gsm_symbolic``, ``nemo_anchored_countdown``,
``nemo_anchored_medcalc``) and the hooks they call (hooks.py). Run them with
``lm_eval --include_path <this folder> --apply_chat_template ...`` (the README has the command).

The hooks take the examples, prompts and scorers from nemo_anchored.eval, so a task here and the
same task in `nemo-anchored eval` see the same questions (``--metadata '{"limit": N, "seed": S}'``
draws the sample ``--limit N --seed S`` draws; a built task's examples come from the JSONL named by
its task name, e.g. ``"gsm_symbolic": "data/gsm_symbolic/test.jsonl"``), the same single user
turn, and the same scoring. Where lm-eval's own machinery differs from ours:

- MMLU: lm-eval moves the prompt's trailing whitespace (the newline that ends most chat
  templates' generation prompt) into the answer, so each letter's log-likelihood also counts
  log p(newline | prompt): the same term for all four letters, so the same prediction (near 0
  for a model trained on its template). It also tokenizes prompt and letter together where we
  tokenize them apart; the two agree whenever no token spans the newline and the letter (true
  of byte-level BPE tokenizers such as SmolLM2's and Llama's).
- Generation stops at the end-of-sequence *string* (lm-eval decodes the eos token and cuts the
  text there) where we stop at any of the tokenizer's stop ids (eos and end-of-turn); when the
  chat template's end-of-turn token is not eos, lm-eval also stops at transformers' own eos ids
  from generation_config.json. Both decode without special tokens.
- HumanEval (executed programs) is not defined here.
"""
