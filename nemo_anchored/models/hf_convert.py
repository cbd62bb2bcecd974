"""Hugging Face <-> megatron-core checkpoint conversion for the Llama and Qwen2 families.

    nemo-anchored convert hf-to-mcore --hf PATH --out DIR [--tp N --pp M] [--gguf-file NAME]
    nemo-anchored convert mcore-to-hf --checkpoint CKPT --base DIR --out HF_DIR

**hf-to-mcore** reads a ``LlamaForCausalLM`` or ``Qwen2ForCausalLM`` folder (config.json,
tokenizer, ``*.safetensors``) and writes ``DIR``, usable as ``model.base_checkpoint=DIR``::

    DIR/                  a nemo-anchored checkpoint (complete.json, torch_dist tensors); loads
                          at any TP x PP layout, whatever --tp/--pp wrote it
    DIR/hf/               config.json (+ generation_config.json): the architecture, for export
    DIR/tokenizer/        the tokenizer (save_pretrained, chat template included), for
                          ``data.tokenizer=DIR/tokenizer``
    DIR/model.yaml        the recipe's ``model:`` keys (our ModelConfig fields)

With ``--tp N --pp M`` it runs N*M local gloo processes (CUDA hidden: conversion is CPU work);
each builds only its own shard of the megatron model and fills it tensor by tensor from the
safetensors files (``safe_open``: one Hugging Face tensor in memory at a time, plus the shard),
then all save one checkpoint together. Peak memory per process is about 1/(N*M) of the model
plus the tensor in conversion (at most the embedding, twice while its rows are padded). With
``--gguf-file`` transformers dequantizes the whole GGUF file into memory (once, in the parent
process), which writes the weights to a temporary safetensors file that the shard processes
then stream like any other checkpoint.

Atomicity: everything is written to ``DIR.converting`` (the checkpoint's completeness marker
withdrawn while the tokenizer and configs are added) and renamed to ``DIR`` at the very end, so
a conversion that dies half-way leaves no ``DIR`` and nothing that loads; a re-run deletes the
leftovers.

**mcore-to-hf** exports a nemo-anchored checkpoint (any layout it was saved at) with the
architecture and tokenizer of the hf-to-mcore output it started from: config.json,
generation_config.json, the tokenizer files and safetensors shards (``--max-shard-size``, with
``model.safetensors.index.json`` when there is more than one). It streams: the embedding, each
layer and the head are read from the checkpoint one at a time (torch.distributed.checkpoint reads
just that slice of megatron's layer-stacked tensors) and each shard file is written as soon as
its tensors are complete. Padded vocabulary rows are cut. It writes ``HF_DIR.tmp`` and renames it.

Layouts (verified against megatron-core 0.16.1 and, in the tests, transformers' logits):
megatron fuses Q, K and V into ``linear_qkv`` grouped per query group (for each group g: its
heads/groups query heads, then its key head, then its value head, each ``head_dim`` rows, the
bias alike) and SwiGLU's gate and up projections into ``linear_fc1`` as ``[gate; up]``. Both use
the rotate-half RoPE convention of Hugging Face's Llama, so Q and K need no permutation.
"""

import contextlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.multiprocessing as mp
from safetensors import safe_open
from safetensors.torch import save_file

from nemo_anchored.models.gpt import TORCH_DTYPES, GPTConfig, padded_vocab_size

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_SUBDIR = "hf"
TOKENIZER_SUBDIR = "tokenizer"
MODEL_YAML = "model.yaml"
_STAGING_SUFFIX = ".converting"
_GGUF_WEIGHTS_SUFFIX = ".gguf-weights"
_PENDING_MARKER = "complete.json.pending"
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
# Megatron-core's Llama 3 RoPE scaling hard-codes these; only the factor is a parameter.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}
# Buffers some older Llama checkpoints saved; recomputed from the config, never needed.
_IGNORED_HF_TENSOR = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


class ConversionError(ValueError):
    """Input that cannot be converted (unsupported architecture, missing or misshapen tensor,
    checkpoint that does not match the configuration, ...), with what and where in the text."""


# ------------------------------------------------------------------------- configuration


def _transformers():
    # Conversion only ever reads local folders: never let transformers reach for the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    return transformers


def load_hf_config(path, gguf_file: Optional[str] = None):
    """The transformers config of the model folder ``path`` (from its GGUF file if given)."""
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(str(path), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        source = f"{path}/{gguf_file}" if gguf_file else f"{path}/config.json"
        raise ConversionError(f"cannot read the Hugging Face config {source}: {err}") from err


def _rope(hf) -> Tuple[float, bool, float]:
    """(rotary base, Llama 3 scaling on?, scaling factor) of a transformers config."""
    params = dict(getattr(hf, "rope_parameters", None) or {})
    if not params:  # transformers < 5 keeps rope_theta and rope_scaling apart
        params = {**(getattr(hf, "rope_scaling", None) or {}),
                  "rope_theta": getattr(hf, "rope_theta", 10000.0)}
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return theta, False, 8.0
    supported = ", ".join(f"{k}={v:g}" for k, v in _LLAMA3_ROPE_FIXED.items())
    if rope_type != "llama3":
        raise ConversionError(
            f"rope scaling type {rope_type!r} is not supported: megatron-core's GPTModel "
            f"implements only Llama 3's ('llama3' with {supported})")
    wrong = {k: params.get(k) for k, v in _LLAMA3_ROPE_FIXED.items() if params.get(k) != v}
    if wrong:
        raise ConversionError(
            f"llama3 rope scaling with {wrong} is not supported: megatron-core fixes {supported}")
    factor = float(params.get("factor", 0.0))
    if factor < 1:
        raise ConversionError(f"llama3 rope scaling factor {factor} must be >= 1")
    return theta, True, factor


def gpt_config_from_hf(hf, *, dtype: str = "float32",
                       make_vocab_size_divisible_by: int = 128) -> GPTConfig:
    """Our architecture for a transformers Llama or Qwen2 config; refuses what megatron's
    GPTModel cannot express exactly (other architectures, biases beyond Qwen2's QKV bias,
    sliding-window attention, RoPE scaling other than Llama 3's, non-SiLU activations)."""
    model_type = getattr(hf, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture: model_type {model_type!r} "
            f"(architectures {getattr(hf, 'architectures', None)}); supported: "
            f"{', '.join(ARCHITECTURES.values())}")
    architectures = getattr(hf, "architectures", None) or [ARCHITECTURES[model_type]]
    if list(architectures) != [ARCHITECTURES[model_type]]:
        raise ConversionError(f"unsupported architecture {architectures}: only "
                              f"{ARCHITECTURES[model_type]} for model_type {model_type!r}")
    if hf.hidden_act != "silu":
        raise ConversionError(f"hidden_act {hf.hidden_act!r} is not supported (SwiGLU with silu)")
    if model_type == "llama" and (getattr(hf, "attention_bias", False)
                                  or getattr(hf, "mlp_bias", False)):
        raise ConversionError("Llama with attention_bias or mlp_bias is not supported "
                              "(megatron's GPT here has no linear biases besides Qwen2's QKV)")
    if model_type == "qwen2":
        layer_types = getattr(hf, "layer_types", None) or []
        if getattr(hf, "use_sliding_window", False) or any(
                t != "full_attention" for t in layer_types):
            raise ConversionError("Qwen2 with sliding-window attention is not supported")
    heads = hf.num_attention_heads
    groups = getattr(hf, "num_key_value_heads", None) or heads
    if heads % groups:
        raise ConversionError(f"num_key_value_heads={groups} does not divide "
                              f"num_attention_heads={heads}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
    theta, rope_scaling, rope_factor = _rope(hf)
    if dtype not in TORCH_DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    return GPTConfig(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=hf.intermediate_size,
        kv_channels=head_dim,
        vocab_size=hf.vocab_size,
        max_seq_len=hf.max_position_embeddings,
        tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        add_qkv_bias=model_type == "qwen2",
        rotary_base=theta,
        rope_scaling=rope_scaling,
        rope_scaling_factor=rope_factor,
        norm_epsilon=float(hf.rms_norm_eps),
        dtype=dtype,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )


def check_layout(cfg: GPTConfig, tp: int, pp: int) -> None:
    """The TP x PP layout must split heads, query groups, the vocabulary and the layers evenly."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    padded = padded_vocab_size(cfg.vocab_size, cfg.make_vocab_size_divisible_by)
    if tp < 1 or pp < 1:
        raise ConversionError(f"--tp {tp} --pp {pp}: both must be >= 1")
    if groups % tp or padded % tp:
        raise ConversionError(f"--tp {tp} must divide the query groups ({groups}) and the padded "
                              f"vocabulary ({padded})")
    if cfg.num_layers % pp:
        raise ConversionError(f"--pp {pp} must divide the {cfg.num_layers} layers")


# ------------------------------------------------------------------------- tensor layout


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the Hugging Face tensors it is made of."""

    mcore: str  # megatron's TP=1, PP=1 state-dict key
    checkpoint: str  # its name in a dist checkpoint, where layers are stacked along dim 0
    layer: Optional[int]  # its index along that dimension; None for non-layer tensors
    hf: Tuple[str, ...]  # the Hugging Face tensors, in fusion order
    kind: str  # copy | vocab (rows padded in megatron) | qkv | gate_up


# (megatron suffix, checkpoint suffix, Hugging Face suffixes, kind) of each layer's tensors.
# The checkpoint names are Transformer Engine's (the local spec maps its norms onto them).
_LAYER_TENSORS = (
    ("input_layernorm.weight", "self_attention.linear_qkv.layer_norm_weight",
     ("input_layernorm.weight",), "copy"),
    ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias", "self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    ("self_attention.linear_proj.weight", "self_attention.linear_proj.weight",
     ("self_attn.o_proj.weight",), "copy"),
    ("pre_mlp_layernorm.weight", "mlp.linear_fc1.layer_norm_weight",
     ("post_attention_layernorm.weight",), "copy"),
    ("mlp.linear_fc1.weight", "mlp.linear_fc1.weight",
     ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "gate_up"),
    ("mlp.linear_fc2.weight", "mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)


def tensor_maps(cfg: GPTConfig) -> List[TensorMap]:
    """Every megatron tensor of ``cfg``, in Hugging Face order (embedding, layers, norm, head)."""
    maps = [TensorMap("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                      None, ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_layers):
        for mcore, checkpoint, hf, kind in _LAYER_TENSORS:
            if mcore.endswith(".bias") and not cfg.add_qkv_bias:
                continue
            maps.append(TensorMap(f"decoder.layers.{i}.{mcore}", f"decoder.layers.{checkpoint}",
                                  i, tuple(f"model.layers.{i}.{s}" for s in hf), kind))
    maps.append(TensorMap("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                          None, ("model.norm.weight",), "copy"))
    if not cfg.tie_embeddings:
        maps.append(TensorMap("output_layer.weight", "output_layer.weight", None,
                              ("lm_head.weight",), "vocab"))
    return maps


def _heads(cfg: GPTConfig) -> Tuple[int, int, int]:
    """(query heads per group, query groups, head dim)."""
    groups = cfg.num_query_groups or cfg.num_attention_heads
    head_dim = cfg.kv_channels or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_attention_heads // groups, groups, head_dim


def hf_shapes(cfg: GPTConfig) -> Dict[str, Tuple[int, ...]]:
    """The shape of every Hugging Face tensor ``cfg`` implies."""
    per_group, groups, head_dim = _heads(cfg)
    q_rows, kv_rows = per_group * groups * head_dim, groups * head_dim
    h, ffn = cfg.hidden_size, cfg.ffn_hidden_size or 4 * cfg.hidden_size
    by_suffix = {
        "embed_tokens.weight": (cfg.vocab_size, h), "lm_head.weight": (cfg.vocab_size, h),
        "layernorm.weight": (h,), "norm.weight": (h,),
        "q_proj.weight": (q_rows, h), "k_proj.weight": (kv_rows, h),
        "v_proj.weight": (kv_rows, h), "q_proj.bias": (q_rows,), "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,), "o_proj.weight": (h, q_rows),
        "gate_proj.weight": (ffn, h), "up_proj.weight": (ffn, h), "down_proj.weight": (h, ffn),
    }
    shapes = {}
    for m in tensor_maps(cfg):
        for name in m.hf:  # the first suffix that matches ("layernorm" comes before "norm")
            shapes[name] = next(shape for suffix, shape in by_suffix.items()
                                if name.endswith(suffix))
    return shapes


def fuse(kind: str, tensors: Sequence[torch.Tensor], cfg: GPTConfig) -> torch.Tensor:
    """The megatron TP=1 tensor made of these Hugging Face tensors (vocabulary not padded)."""
    if kind in ("copy", "vocab"):
        return tensors[0]
    if kind == "gate_up":
        return torch.cat(tensors)
    per_group, groups, head_dim = _heads(cfg)
    q, k, v = tensors
    rest = q.shape[1:]
    return torch.cat([q.reshape(groups, per_group * head_dim, *rest),
                      k.reshape(groups, head_dim, *rest),
                      v.reshape(groups, head_dim, *rest)], dim=1).reshape(-1, *rest)


def split(kind: str, tensor: torch.Tensor, cfg: GPTConfig) -> Tuple[torch.Tensor, ...]:
    """The inverse of ``fuse``; vocabulary rows beyond ``cfg.vocab_size`` (padding) are cut."""
    if kind == "copy":
        return (tensor,)
    if kind == "vocab":
        return (tensor[: cfg.vocab_size],)
    if kind == "gate_up":
        return tuple(torch.chunk(tensor, 2))
    per_group, groups, head_dim = _heads(cfg)
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *rest)
    q_end = per_group * head_dim
    return (grouped[:, :q_end].reshape(-1, *rest),
            grouped[:, q_end:q_end + head_dim].reshape(-1, *rest),
            grouped[:, q_end + head_dim:].reshape(-1, *rest))


def _check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ConversionError(f"{what} has non-finite values (NaN or inf)")


# ---------------------------------------------------------------- Hugging Face checkpoints


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face safetensors checkpoint folder, read one at a time.

    Uses ``model.safetensors.index.json`` when present, else every ``*.safetensors`` file in
    the folder. Only headers are read up front; ``get`` reads one tensor.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._handles = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as err:
                raise ConversionError(f"{index}: not a safetensors index ({err})") from err
            self._files = {name: self.folder / file for name, file in weight_map.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise ConversionError(f"{self.folder}: no *.safetensors weights (PyTorch .bin "
                                      f"checkpoints are not supported; or pass --gguf-file)")
            self._files = {}
            for file in files:
                for name in self._open(file).keys():
                    if name in self._files:
                        raise ConversionError(f"tensor {name} is in both {self._files[name]} "
                                              f"and {file}")
                    self._files[name] = file

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise ConversionError(f"{file} (listed in the safetensors index) does not exist")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError
                raise ConversionError(f"{file}: unreadable safetensors file: {err}") from err
        return self._handles[file]

    def names(self) -> List[str]:
        return list(self._files)

    def file(self, name: str) -> Path:
        return self._files[name]

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._open(self._files[name]).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The safetensors dtype string, e.g. ``BF16``."""
        return self._open(self._files[name]).get_slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        file = self._files[name]
        try:
            return self._open(file).get_tensor(name)
        except Exception as err:
            raise ConversionError(f"cannot read tensor {name} from {file}: {err}") from err


def check_hf_tensors(reader: SafetensorsCheckpoint, cfg: GPTConfig, config_source: str) -> None:
    """Every tensor ``cfg`` needs is present with the right shape and a float dtype, and there
    is no tensor the conversion would drop (headers only: nothing is loaded)."""
    expected = hf_shapes(cfg)
    names = set(reader.names())
    missing = [name for name in expected if name not in names]
    if missing:
        raise ConversionError(f"{reader.folder}: tensor(s) missing from the checkpoint: "
                              f"{', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else ""))
    for name, shape in expected.items():
        got = reader.shape(name)
        if got != shape:
            raise ConversionError(f"tensor {name} in {reader.file(name)} has shape {got}, "
                                  f"{config_source} implies {shape}")
        if reader.dtype(name) not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"tensor {name} in {reader.file(name)} has dtype "
                                  f"{reader.dtype(name)}; expected one of "
                                  f"{', '.join(_SAFETENSORS_DTYPES)}")
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()  # tied: transformers too
    unexpected = sorted(n for n in names - set(expected) - ignorable
                        if not _IGNORED_HF_TENSOR.match(n))
    if unexpected:
        raise ConversionError(f"{reader.folder}: tensor(s) this architecture does not use "
                              f"(they would be lost): {', '.join(unexpected[:5])}"
                              + (" ..." if len(unexpected) > 5 else ""))


class _MegatronStateDict(Mapping):
    """megatron's TP=1, PP=1 state dict, each tensor fused from the Hugging Face tensors on
    access, so that ``load_full_state_dict`` streams: one tensor in memory at a time."""

    def __init__(self, reader: SafetensorsCheckpoint, cfg: GPTConfig):
        self._reader, self._cfg = reader, cfg
        self._maps = {m.mcore: m for m in tensor_maps(cfg)}

    def __getitem__(self, key: str) -> torch.Tensor:
        m = self._maps[key]
        tensors = [self._reader.get(name) for name in m.hf]
        for name, tensor in zip(m.hf, tensors):
            _check_finite(tensor, f"tensor {name} in {self._reader.file(name)}")
        return fuse(m.kind, tensors, self._cfg)

    def __iter__(self) -> Iterator[str]:
        return iter(self._maps)

    def __len__(self) -> int:
        return len(self._maps)


# ------------------------------------------------------------------------------ hf-to-mcore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environment(**values: Optional[str]) -> Iterator[None]:
    """Set (None: unset) environment variables for the processes started inside the block."""
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _convert_rank(rank: int, weights: str, cfg: GPTConfig, tp: int, pp: int, staging: str,
                  errors: str) -> None:
    """One shard process: build this rank's part of the model, fill it, save collectively."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank))
    try:
        from nemo_anchored.models.gpt import build_gpt_model, load_full_state_dict
        from nemo_anchored.parallel.distributed import init_model_parallel, shutdown
        from nemo_anchored.training.checkpoint import save_checkpoint

        init_model_parallel(tp, pp, seed=0)
        # No random initialisation: load_full_state_dict writes every weight.
        model = build_gpt_model(cfg, use_transformer_engine=False, initialize=False)
        load_full_state_dict(model, _MegatronStateDict(SafetensorsCheckpoint(weights), cfg))
        save_checkpoint(staging, model=model)
        shutdown()
    except BaseException as err:  # reported to the parent, which names it in its error
        with open(errors, "a") as f:
            f.write(f"rank {rank}: {type(err).__name__}: {err}\n")
        raise


def _write_gguf_weights(hf_path: Path, gguf_file: str, hf_config, cfg: GPTConfig,
                        folder: Path) -> None:
    """Dequantize the GGUF model (all of it in memory: transformers has no streaming GGUF
    reader) and write the tensors ``cfg`` needs to ``folder/model.safetensors``."""
    transformers = _transformers()
    # The config already read: each GGUF read parses the whole metadata (seconds).
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(hf_path), gguf_file=gguf_file, config=hf_config, dtype=torch.float32)
    state = model.state_dict()
    missing = [name for name in hf_shapes(cfg) if name not in state]
    if missing:
        raise ConversionError(f"{hf_path}/{gguf_file}: tensor(s) missing: {', '.join(missing)}")
    folder.mkdir(parents=True)
    save_file({name: state[name].contiguous() for name in hf_shapes(cfg)},
              str(folder / "model.safetensors"), metadata={"format": "pt"})


def _checkpoint_dtype(reader: SafetensorsCheckpoint) -> str:
    return _SAFETENSORS_DTYPES[reader.dtype("model.embed_tokens.weight")]


def _add_legacy_rope_keys(config_path: Path) -> None:
    """transformers >= 5 writes the RoPE settings only as ``rope_parameters``; older versions
    (an lm-evaluation-harness environment, say) read ``rope_theta`` / ``rope_scaling`` and
    would silently use their defaults. transformers 5 loads both forms alike."""
    config = json.loads(config_path.read_text())
    rope = config.get("rope_parameters")
    if rope:
        config.setdefault("rope_theta", rope["rope_theta"])
        if rope.get("rope_type", "default") != "default":
            config.setdefault("rope_scaling",
                              {k: v for k, v in rope.items() if k != "rope_theta"})
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_hf_side(hf_path: Path, gguf_file: Optional[str], hf_config, tokenizer,
                  staging: Path) -> None:
    """The configs export needs (DIR/hf) and the tokenizer (DIR/tokenizer)."""
    hf_dir = staging / HF_SUBDIR
    hf_dir.mkdir()
    if gguf_file is None:
        # Verbatim: the exported config.json is then exactly the one the model came with.
        for name in ("config.json", "generation_config.json"):
            if (hf_path / name).is_file():
                shutil.copy2(hf_path / name, hf_dir / name)
    else:
        hf_config.architectures = [ARCHITECTURES[hf_config.model_type]]
        hf_config.save_pretrained(str(hf_dir))
        _add_legacy_rope_keys(hf_dir / "config.json")
        generation = _transformers().GenerationConfig.from_model_config(hf_config)
        generation.save_pretrained(str(hf_dir))
    tokenizer.save_pretrained(str(staging / TOKENIZER_SUBDIR))


def model_yaml(cfg: GPTConfig, base_checkpoint: Path) -> str:
    """The ``model:`` section of a recipe for the converted model."""
    import yaml

    keys = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
            "ffn_hidden_size", "kv_channels", "vocab_size", "max_seq_len", "tie_embeddings",
            "add_qkv_bias", "rotary_base", "rope_scaling", "rope_scaling_factor",
            "norm_epsilon", "dtype", "make_vocab_size_divisible_by")
    section = {key: getattr(cfg, key) for key in keys}
    section["base_checkpoint"] = str(base_checkpoint)
    header = ("# The model section for a nemo-anchored recipe (written by `nemo-anchored "
              "convert hf-to-mcore`).\n"
              f"# Its tokenizer: data.tokenizer={base_checkpoint / TOKENIZER_SUBDIR}\n")
    return header + yaml.safe_dump({"model": section}, sort_keys=False)


def _remove(*paths: Path) -> None:
    for path in paths:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def convert_hf_to_mcore(hf_path, out, *, tp: int = 1, pp: int = 1,
                        gguf_file: Optional[str] = None, dtype: Optional[str] = None,
                        make_vocab_size_divisible_by: int = 128) -> Path:
    """Convert the Hugging Face model folder ``hf_path`` into the nemo-anchored directory
    ``out`` (see the module docstring), with ``tp * pp`` shard processes. ``dtype`` (float32,
    bfloat16, float16) defaults to the checkpoint's (float32 for GGUF). Returns ``out``.

    The shard processes are started with the ``spawn`` method, which re-imports the calling
    script: call this from a script only under ``if __name__ == "__main__":``."""
    from nemo_anchored.training.checkpoint import MARKER, fsync_dir

    hf_path, out = Path(hf_path), Path(out).absolute()
    if not hf_path.is_dir():
        raise ConversionError(f"--hf {hf_path}: not a directory")
    if out.exists():
        raise ConversionError(f"--out {out} already exists; remove it or choose another")
    hf_config = load_hf_config(hf_path, gguf_file)
    source = f"{hf_path}/{gguf_file}" if gguf_file else f"{hf_path}/config.json"
    cfg = gpt_config_from_hf(hf_config, dtype=dtype or "float32",
                             make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    check_layout(cfg, tp, pp)
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_path), gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as err:
        raise ConversionError(f"{source}: no Hugging Face tokenizer can be loaded: {err}") from err

    staging = out.with_name(out.name + _STAGING_SUFFIX)
    staging_tmp = staging.with_name(staging.name + ".tmp")  # save_checkpoint's work directory
    gguf_weights = out.with_name(out.name + _GGUF_WEIGHTS_SUFFIX)
    _remove(staging, staging_tmp, gguf_weights)  # leftovers of a conversion that died
    out.parent.mkdir(parents=True, exist_ok=True)
    errors = tempfile.NamedTemporaryFile("r", suffix=".errors", delete=False)
    try:
        weights = hf_path
        if gguf_file is not None:
            _write_gguf_weights(hf_path, gguf_file, hf_config, cfg, gguf_weights)
            weights = gguf_weights
        reader = SafetensorsCheckpoint(weights)
        check_hf_tensors(reader, cfg, source)
        if dtype is None and gguf_file is None:
            cfg = replace(cfg, dtype=_checkpoint_dtype(reader))
        del reader

        nprocs = tp * pp
        environment = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                       "WORLD_SIZE": str(nprocs), "CUDA_VISIBLE_DEVICES": "",
                       "OMP_NUM_THREADS": os.environ.get(
                           "OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nprocs))),
                       "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                       # Under torchrun, this would send the shard processes to its store.
                       "TORCHELASTIC_USE_AGENT_STORE": None}
        with _environment(**environment):
            try:
                mp.start_processes(_convert_rank, nprocs=nprocs, start_method="spawn",
                                   args=(str(weights), cfg, tp, pp, str(staging), errors.name))
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
                reported = errors.read().strip()
                raise ConversionError(f"converting {source} failed:\n{reported or err}") from None

        # Withdrawn while the rest is added, so that no half-finished directory ever loads.
        os.replace(staging / MARKER, staging / _PENDING_MARKER)
        _save_hf_side(hf_path, gguf_file, hf_config, tokenizer, staging)
        (staging / MODEL_YAML).write_text(model_yaml(cfg, out))
        os.replace(staging / _PENDING_MARKER, staging / MARKER)
        staging.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        _remove(staging, staging_tmp)
        raise
    finally:
        errors.close()
        os.unlink(errors.name)
        _remove(gguf_weights)
    return out


# ------------------------------------------------------------------------------ mcore-to-hf


def parse_size(text) -> int:
    """Bytes in ``5GB`` (10^9), ``500MiB`` (2^20), ``1000`` ..."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if match is None or match.group(2).upper() not in units:
        raise ConversionError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * units[match.group(2).upper()])
    if size < 1:
        raise ConversionError(f"--max-shard-size {text!r} must be positive")
    return size


def plan_shards(sizes: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Tensor names split, in order, into shards of at most ``max_bytes`` (a larger tensor gets
    a shard of its own)."""
    shards, current, used = [], [], 0
    for name, size in sizes:
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def _shard_file_names(count: int) -> List[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _check_checkpoint_shapes(path: Path, metadata, cfg: GPTConfig, source: str) -> None:
    """The checkpoint holds exactly the tensors of ``cfg``'s architecture, in its shapes."""
    expected = {}
    hf = hf_shapes(cfg)
    for m in tensor_maps(cfg):
        shape = fuse(m.kind, [torch.empty(hf[name], device="meta") for name in m.hf], cfg).shape
        expected[m.checkpoint] = shape if m.layer is None else (cfg.num_layers, *shape)
    model_keys = {k for k in metadata if k.startswith(("embedding.", "decoder.", "output_layer."))}
    missing, unexpected = sorted(set(expected) - model_keys), sorted(model_keys - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"checkpoint {path} does not match the architecture in {source}: missing "
            f"{missing[:5]}, not in that architecture {unexpected[:5]}")
    for key, shape in expected.items():
        got = metadata[key][0]
        vocab_rows_ok = (key in ("embedding.word_embeddings.weight", "output_layer.weight")
                         and got[1:] == tuple(shape[1:]) and got[0] >= cfg.vocab_size)
        if got != tuple(shape) and not vocab_rows_ok:
            raise ConversionError(f"checkpoint {path}: {key} has shape {got}, {source} implies "
                                  f"{tuple(shape)}")


def _checkpoint_metadata(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype]]:
    """(global shape, dtype) of every tensor in the torch_dist checkpoint at ``path``."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except (OSError, ValueError, RuntimeError) as err:
        raise ConversionError(f"checkpoint {path}: unreadable tensor index: {err}") from err
    return {key: (tuple(md.size), md.properties.dtype)
            for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)}


def _read_checkpoint(path: Path, metadata, cfg: GPTConfig
                     ) -> Iterator[Tuple[TensorMap, torch.Tensor]]:
    """Each megatron tensor of ``cfg`` at TP=1 (layer tensors one layer at a time), in the
    order of ``tensor_maps``: the embedding, then layer by layer, then the final norm and head.

    torch.distributed.checkpoint reads just the requested slice of each global tensor (a layer
    of megatron's layer-stacked tensors), in this process alone (no process group).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class SlicePlanner(DefaultLoadPlanner):
        """Fills each requested tensor from the slice of its global tensor at ``offsets``."""

        def __init__(self, offsets: Dict[str, Tuple[int, ...]]):
            super().__init__()
            self.offsets = offsets

        def create_local_plan(self) -> LoadPlan:
            return LoadPlan([item for key, tensor in self.state_dict.items()
                             for item in create_read_items_for_chunk_list(
                                 key, self.metadata.state_dict_metadata[key],
                                 [ChunkStorageMetadata(torch.Size(self.offsets[key]),
                                                       tensor.shape)])])

        def lookup_tensor(self, index) -> torch.Tensor:
            # The read items name the slice by its global offset; the tensor is the slice.
            return self.state_dict[index.fqn]

    maps = tensor_maps(cfg)
    groups = [[maps[0]]] + [[m for m in maps if m.layer == i] for i in range(cfg.num_layers)]
    groups.append([m for m in maps[1:] if m.layer is None])
    for group in groups:
        request, offsets = {}, {}
        for m in group:
            shape, dtype = metadata[m.checkpoint]
            if m.layer is None:
                request[m.checkpoint] = torch.empty(shape, dtype=dtype)
                offsets[m.checkpoint] = (0,) * len(shape)
            else:  # one layer of the layer-stacked tensor
                request[m.checkpoint] = torch.empty((1, *shape[1:]), dtype=dtype)
                offsets[m.checkpoint] = (m.layer,) + (0,) * (len(shape) - 1)
        dcp.load(request, checkpoint_id=str(path), planner=SlicePlanner(offsets), no_dist=True)
        for m in group:
            tensor = request[m.checkpoint]
            yield m, tensor if m.layer is None else tensor[0]


def convert_mcore_to_hf(checkpoint, base, out, *, max_shard_size="5GB",
                        dtype: Optional[str] = None) -> Path:
    """Export the nemo-anchored checkpoint ``checkpoint`` as a Hugging Face model folder ``out``
    with the architecture and tokenizer of ``base`` (an hf-to-mcore output directory). ``dtype``
    defaults to the checkpoint's. Returns ``out``."""
    from nemo_anchored.training.checkpoint import fsync_dir, read_marker

    checkpoint, base, out = Path(checkpoint), Path(base), Path(out).absolute()
    hf_dir, tokenizer_dir = base / HF_SUBDIR, base / TOKENIZER_SUBDIR
    if not (hf_dir / "config.json").is_file() or not tokenizer_dir.is_dir():
        raise ConversionError(f"--base {base}: not an hf-to-mcore output (needs "
                              f"{HF_SUBDIR}/config.json and {TOKENIZER_SUBDIR}/)")
    if out.exists():
        raise ConversionError(f"--out {out} already exists; remove it or choose another")
    max_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype {dtype!r} is not one of {', '.join(TORCH_DTYPES)}")
    source = str(hf_dir / "config.json")
    cfg = gpt_config_from_hf(load_hf_config(hf_dir))
    marker = read_marker(checkpoint)
    if marker.get("vocab_size") not in (None, cfg.vocab_size):
        raise ConversionError(f"checkpoint {checkpoint} has a vocabulary of "
                              f"{marker['vocab_size']} tokens, {source} {cfg.vocab_size}")

    staging = out.with_name(out.name + ".tmp")
    _remove(staging)
    staging.mkdir(parents=True)
    try:
        metadata = _checkpoint_metadata(checkpoint)
        _check_checkpoint_shapes(checkpoint, metadata, cfg, source)
        stored = metadata["embedding.word_embeddings.weight"][1]
        out_dtype = TORCH_DTYPES[dtype] if dtype else stored
        sizes = [(name, math.prod(shape) * out_dtype.itemsize)
                 for name, shape in hf_shapes(cfg).items()]
        shards = plan_shards(sizes, max_bytes)
        files = _shard_file_names(len(shards))
        weight_map = {name: file for file, shard in zip(files, shards) for name in shard}
        pending: Dict[str, torch.Tensor] = {}
        shard_index = 0
        for m, tensor in _read_checkpoint(checkpoint, metadata, cfg):
            _check_finite(tensor, f"checkpoint {checkpoint}: {m.checkpoint}"
                          + ("" if m.layer is None else f" (layer {m.layer})"))
            for name, part in zip(m.hf, split(m.kind, tensor, cfg)):
                # A copy of its own: safetensors refuses tensors that share storage.
                pending[name] = part.to(out_dtype, copy=True).contiguous()
            # Write each shard as soon as its tensors are complete.
            while shard_index < len(shards) and all(n in pending for n in shards[shard_index]):
                save_file({n: pending.pop(n) for n in shards[shard_index]},
                          str(staging / files[shard_index]), metadata={"format": "pt"})
                shard_index += 1
        if len(files) > 1:
            index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                     "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = json.loads((hf_dir / "config.json").read_text())
        config["dtype" if "dtype" in config else "torch_dtype"] = str(out_dtype).split(".")[-1]
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if (hf_dir / "generation_config.json").is_file():
            shutil.copy2(hf_dir / "generation_config.json", staging)
        for file in tokenizer_dir.iterdir():
            shutil.copy2(file, staging / file.name)
        staging.rename(out)
        fsync_dir(out.parent)
    except BaseException:
        _remove(staging)
        raise
    return out
