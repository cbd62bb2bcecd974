"""`nemo-anchored convert mcore-to-hf` folders load in the transformers versions evaluation and
serving stacks pin, transformers 4.57 and the venv's 5.x, with the source model's logits, and
their files are readable as the umask allows (group-readable under 022).

The exports are those of the shared conversion run (conftest.py ``hf_conversions``): three tiny
random models (GQA + tied embeddings, sharded into many files; untied + Llama 3 RoPE scaling;
Qwen2) and SmolLM2-135M-Instruct, each with the fp32 logits transformers 5 gave for the model it
came from. transformers 4.57 (with the tokenizers and huggingface-hub it needs) is installed once
into .venv/compat/ with ``pip --target`` (~10 s) and put first on the path of a subprocess, whose
torch and everything else come from the venv. Run as a script, this file is that subprocess.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRANSFORMERS_4 = ("transformers==4.57.6", "tokenizers==0.22.2", "huggingface-hub==0.36.2")
COMPAT_DIR = REPO / ".venv" / "compat" / "transformers-4.57.6"
EXPORTS = ("llama_tied", "llama3_untied", "qwen2", "smollm2")
# Same weights in both versions; what differs is their attention and RoPE code. Observed max
# |diff| over every model: 0 (bitwise equal) on the 2-core CI machine. A config key a version
# misreads (RoPE base or scaling) moves these logits by > 0.1.
LOGIT_TOL = 1e-4
TEXT = "The quick brown fox, 17 + 25 = 42; naïve café <b>bold</b>"
CHAT = [{"role": "system", "content": "You are a terse assistant."},
        {"role": "user", "content": "Add 17 and 25."}]

pytestmark = pytest.mark.slow  # the shared conversion run and transformers subprocesses


@pytest.fixture(scope="module")
def transformers_4() -> Path:
    from nemo_anchored.atomic import staged_directory

    if not COMPAT_DIR.is_dir():  # the staged directory is renamed into place once complete
        with staged_directory(COMPAT_DIR) as staging:
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--target", str(staging), *TRANSFORMERS_4], check=True)
    return COMPAT_DIR


def start_loading(work: Path, first_on_path=None) -> subprocess.Popen:
    """This file as a script, which prints what ``describe_exports`` finds; one thread each, so
    that the two versions' subprocesses run side by side on the 2-core CI machines."""
    path = [str(first_on_path)] if first_on_path else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [str(REPO)]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, __file__, str(work)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loaded(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-4000:]
    return json.loads(stdout.splitlines()[-1])


def test_exports_load_in_transformers_4_and_5_with_the_source_logits(hf_conversions,
                                                                      transformers_4):
    """Each export, loaded with AutoTokenizer and AutoModelForCausalLM: fp32 logits within
    LOGIT_TOL of the source model's in both versions; the same tokenization and chat rendering
    in both (SmolLM2, Qwen2); SmolLM2's chat prompts tokenized as transformers 5 did for the
    source."""
    work, _ = hf_conversions
    processes = {"5": start_loading(work), "4": start_loading(work, transformers_4)}
    try:
        results_of = {version: loaded(process) for version, process in processes.items()}
    finally:
        for process in processes.values():
            process.kill()  # one still running after the other failed; no-op once finished
    assert results_of["4"]["version"] == "4.57.6" and results_of["5"]["version"].startswith("5.")
    for version, results in results_of.items():
        for name in EXPORTS:
            assert results[name]["max_logit_diff"] <= LOGIT_TOL, (version, name, results[name])
        # Real tokenizers only: the tiny models' BPE (a ByteLevel pre-tokenizer with
        # add_prefix_space) is tokenized differently by the two versions (5.x adds the leading
        # space, 4.57 does not), from the very same tokenizer.json.
        for name in ("qwen2", "smollm2"):
            got = results[name]
            assert got == {**results_of["5"][name], "max_logit_diff": got["max_logit_diff"],
                           "tokenizer_class": got["tokenizer_class"]}, (version, name)
        assert results["smollm2"]["chat_ids_match_source"], version


def test_export_files_are_readable_as_the_umask_allows(hf_conversions, tmp_path):
    """Under 022 every file is 0644 (safetensors creates its files 0600); under 027 another
    export of the same checkpoint is 0640."""
    from nemo_anchored.models.hf_export import convert_mcore_to_hf

    work, _ = hf_conversions
    modes = {f.name: f.stat().st_mode & 0o777 for f in (work / "export" / "smollm2").iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes
    previous = os.umask(0o027)
    try:
        out = convert_mcore_to_hf(work / "mcore" / "llama_tied", work / "mcore" / "llama_tied",
                                  tmp_path / "export", max_shard_size="100KB")
    finally:
        os.umask(previous)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert len(modes) > 5 and set(modes.values()) == {0o640}, modes


# ----------------------------------------------------------------- the subprocess (a script)


def describe_exports(work: Path) -> dict:
    """What one transformers version makes of each export in WORK/export."""
    import hashlib

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {"version": transformers.__version__}
    for name in EXPORTS:
        folder = work / "export" / name
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        refs = torch.load(work / "refs" / f"{name}.pt")
        with torch.no_grad():
            diff = max(float((model(tokens).logits - want).abs().max())
                       for tokens, want in zip(refs["tokens"], refs["logits"]))
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
        results[name] = {"tokenizer_class": type(tokenizer).__name__, "max_logit_diff": diff,
                         "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
                         "text_ids": tokenizer.encode(TEXT), "chat": chat,
                         "chat_ids": tokenizer(chat, add_special_tokens=False)["input_ids"]}
        if name == "smollm2":  # the source's tokens are its chat-template prompts
            ids = [tokenizer.apply_chat_template(t, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
                   for t in _smollm2_prompts()]
            results[name]["chat_ids_match_source"] = ids == [t[0].tolist()
                                                             for t in refs["tokens"]]
    return results


def _smollm2_prompts():
    from tests.hf_convert_worker import CHAT_PROMPTS

    return CHAT_PROMPTS


if __name__ == "__main__":
    print(json.dumps(describe_exports(Path(sys.argv[1]))))
