"""What a Hugging Face Llama/Qwen2 model is in megatron-core terms: the architecture mapping and
the one table (``TensorMap``) that drives conversion both ways (``hf_import``, ``hf_export``).

Layouts (verified against megatron-core 0.16.1 and, in the tests, transformers' logits):
megatron fuses Q, K and V into ``linear_qkv`` grouped per query group (for each group g: its
heads/groups query heads, then its key head, then its value head, each ``head_dim`` rows, the
bias alike) and SwiGLU's gate and up projections into ``linear_fc1`` as ``[gate; up]``. Both use
the rotate-half RoPE convention of Hugging Face's Llama, so Q and K need no permutation.

The directory ``nemo-anchored convert hf-to-mcore`` writes, and export reads back::

    DIR/                  a nemo-anchored checkpoint (complete.json, torch_dist tensors); loads
                          at any TP x PP layout, whatever --tp/--pp wrote it
    DIR/hf/               config.json (+ generation_config.json): the architecture, for export
    DIR/tokenizer/        the tokenizer (save_pretrained, chat template included), for
                          ``data.tokenizer=DIR/tokenizer``
    DIR/model.yaml        the recipe's ``model:`` keys (nemo_anchored.config.ModelConfig)
"""
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from nemo_anchored.config import GPTConfig
from nemo_anchored.errors import UserError
from nemo_anchored.models.gpt import TORCH_DTYPES

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
HF_SUBDIR = "hf"
TOKENIZER_SUBDIR = "tokenizer"
MODEL_YAML = "model.yaml"
# Megatron-core's Llama 3 RoPE scaling hard-codes these; only the factor is a parameter.
_LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192}


class ConversionError(ValueError, UserError):
    """Input that cannot be converted (unsupported architecture, missing or misshapen tensor,
    checkpoint that does not match the configuration, ...), with what and where in the text."""


# ------------------------------------------------------------------------- configuration


def transformers_offline():
    # Conversion only ever reads local folders: never let transformers reach for the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import transformers

    return transformers


def load_hf_config(path, gguf_file: Optional[str] = None):
    """The transformers config of the model folder ``path`` (from its GGUF file if given)."""
    transformers = transformers_offline()
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
    if make_vocab_size_divisible_by < 1:  # 0 divides by zero, a negative one cuts the vocabulary
        raise ConversionError(f"--make-vocab-size-divisible-by {make_vocab_size_divisible_by}: "
                              "must be >= 1")
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
    groups = cfg.query_groups
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


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ConversionError(f"{what} has non-finite values (NaN or inf)")
