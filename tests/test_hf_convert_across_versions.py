"""`convert mcore-to-hf` of a checkpoint that megatron-core 0.19 wrote, under this venv's
megatron-core (0.16.1 on CI's Python 3.11). 0.19 keeps dist_checkpointing's common state inside
the torch_dist files and writes no common.pt, so megatron-core 0.16 cannot load its checkpoints
(nemo_anchored/checkpoint/sharded.py refuses them); the export reads the weights with
torch.distributed.checkpoint alone and must not depend on either.

tests/assets/megatron_core_0_19/ holds a tiny random Llama (GQA, untied embeddings, bf16) as
transformers saved it (hf/), and its `convert hf-to-mcore --tp 2` output written by megatron-core
0.19.2 (base/). This file run as a script in a venv with megatron-core >= 0.19 (Python 3.12)
writes them again: `python tests/test_hf_convert_across_versions.py FOLDER`.
"""
import json
import subprocess
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).with_name("assets") / "megatron_core_0_19"
REPO = Path(__file__).resolve().parents[1]


def test_a_megatron_core_0_19_checkpoint_exports_to_its_source_weights(tmp_path):
    from nemo_anchored.models.hf_export import convert_mcore_to_hf
    from tests.hf_convert_worker import load_safetensors_folder

    base = ASSETS / "base"
    marker = json.loads((base / "complete.json").read_text())
    assert marker["megatron_core"].startswith("0.19.") and not (base / "common.pt").exists()
    assert marker["layout"]["tensor_parallel"] == 2

    out = convert_mcore_to_hf(base, base, tmp_path / "export")
    source, exported = load_safetensors_folder(ASSETS / "hf"), load_safetensors_folder(out)
    assert sorted(exported) == sorted(source)
    unequal = [name for name in source if not torch.equal(source[name], exported[name])]
    assert not unequal, unequal
    assert all(t.dtype == torch.bfloat16 for t in exported.values())


def _write_assets(folder: Path) -> None:
    import megatron.core
    from transformers import AutoModelForCausalLM, LlamaConfig

    from nemo_anchored.checkpoint.sharded import _COMMON_STATE_IN_TORCH_DIST, _megatron_release
    from tests.hf_convert_worker import tiny_tokenizer

    release = _megatron_release(megatron.core.__version__)
    assert release >= _COMMON_STATE_IN_TORCH_DIST, megatron.core.__version__
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, intermediate_size=48, vocab_size=300,
                         tie_word_embeddings=False, max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder / "hf")
    tiny_tokenizer().save_pretrained(folder / "hf")
    subprocess.run([sys.executable, "-m", "nemo_anchored", "convert", "hf-to-mcore", "--hf",
                    str(folder / "hf"), "--out", str(folder / "base"), "--tp", "2"],
                   cwd=REPO, check=True)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _write_assets(Path(sys.argv[1]).absolute())
