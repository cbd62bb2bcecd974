"""Llama-style megatron-core GPT models from a plain config, plus layout-independent weights.

The model keeps megatron-core's tensor-parallel conventions, but the vocabulary is padded to a
multiple of ``make_vocab_size_divisible_by`` alone (``GPTConfig.padded_vocab_size``); a forward
without labels returns vocab-sharded logits ``[b, s, V_padded / TP]`` (``parallel_output=True``).
The padded columns are not part of the vocabulary: ``mask_padded_vocab`` sets their logits to
-inf so they carry no probability mass (the anchored loss treats -inf columns as absent).

``load_full_state_dict`` fills a model of any TP x PP layout from an unsharded (TP=1, PP=1) state
dict, driven by the tensor-parallel attributes megatron puts on each parameter, so layouts can be
compared exactly and unsharded checkpoints (e.g. converted Hugging Face weights) can be loaded.
"""

import importlib.util
import re
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from nemo_anchored.config import MODEL_DTYPES, ConfigError, GPTConfig, check_layout

TORCH_DTYPES = {name: getattr(torch, name) for name in MODEL_DTYPES}


def transformer_engine_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def _leave_uninitialised(weight: torch.Tensor) -> None:
    """An init method that keeps the allocated memory as it is."""


def transformer_config(cfg: GPTConfig, initialize: bool = True, sequence_parallel: bool = False):
    """The megatron ``TransformerConfig`` for ``cfg`` in the current parallel layout
    (``initialize=False``: weights are allocated but not initialised; ``sequence_parallel``
    needs Transformer Engine's norms, on GPU machines: megatron's torch norms refuse it)."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = TORCH_DTYPES[cfg.dtype]
    pp_size = parallel_state.get_pipeline_model_parallel_world_size()
    # Not perform_initialization=False: megatron then also skips setting the tensor-parallel
    # attributes of its weights, which sharding and checkpoints rely on.
    skip_init = {} if initialize else {
        name: _leave_uninitialised
        for name in ("init_method", "output_layer_init_method", "embedding_init_method")}
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.kv_channels,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.add_qkv_bias,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        init_method_std=cfg.init_method_std,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # The P2P layer allocates receive buffers in this dtype; megatron requires it under PP.
        pipeline_dtype=dtype if pp_size > 1 else None,
        # Free each stage's sent activations right after the send (megatron's training default);
        # the exchanged tensor here is n_models times the hidden size.
        deallocate_pipeline_outputs=True,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=pp_size,
        sequence_parallel=sequence_parallel,
        **_recompute_settings(cfg),
        **skip_init,
    )


def _recompute_settings(cfg: GPTConfig) -> dict:
    """``model.recompute*`` as TransformerConfig's recompute fields (megatron refuses a method or
    a number of layers with selective recomputation, whose module is the core attention)."""
    if cfg.recompute is None:
        return {}
    if cfg.recompute == "selective":
        return {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    return {"recompute_granularity": "full", "recompute_method": cfg.recompute_method,
            "recompute_num_layers": cfg.recompute_num_layers}


def attention_backend(cfg: GPTConfig, use_transformer_engine: Optional[bool] = None) -> str:
    """The core attention a model of ``cfg`` gets: ``te``, ``sdpa`` or ``local``
    (``model.attention``, with ``auto`` resolved on this machine). ``use_transformer_engine=False``
    asks for a local-spec model (the converter's, whose state dict keys it writes): ``auto`` is
    then ``sdpa``."""
    backend = cfg.attention
    if backend == "auto":
        te = transformer_engine_available() if use_transformer_engine is None \
            else use_transformer_engine
        return "te" if te else "sdpa"
    if backend == "te" and use_transformer_engine is False:
        raise ConfigError("model.attention: te, but this model must use megatron's local layer "
                          "spec; use sdpa or local")
    if backend == "te" and not transformer_engine_available():
        raise ConfigError("model.attention: te, but Transformer Engine is not installed here; "
                          "use auto, sdpa or local")
    return backend


def build_gpt_model(cfg: GPTConfig, use_transformer_engine: Optional[bool] = None,
                    initialize: bool = True, sequence_parallel: bool = False):
    """Build this rank's part of a megatron-core ``GPTModel`` (its pipeline stage, its TP shard).

    The layer spec follows ``attention_backend``: Transformer Engine's, or megatron-core's local
    spec with ``models.attention.SDPAttention`` or megatron's ``DotProductAttention`` as its core
    attention. ``initialize=False`` skips the random initialisation (whose cost grows with the
    model) for a model whose every weight is loaded next; its weights are then uninitialised
    memory.
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    backend = attention_backend(cfg, use_transformer_engine)
    if backend == "te":
        layer_spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        layer_spec = get_gpt_layer_local_spec(normalization="RMSNorm")
        if backend == "sdpa":
            from nemo_anchored.models.attention import SDPAttention

            layer_spec.submodules.self_attention.submodules.core_attention = SDPAttention
    check_layout(cfg, parallel_state.get_tensor_model_parallel_world_size(),
                 parallel_state.get_pipeline_model_parallel_world_size(),
                 tp_key="tensor-parallel size", pp_key="pipeline-parallel size")
    from nemo_anchored.models.positions import PositionalGPTModel

    model = PositionalGPTModel(
        config=transformer_config(cfg, initialize, sequence_parallel),
        transformer_layer_spec=layer_spec,
        vocab_size=cfg.padded_vocab_size,
        max_sequence_length=cfg.max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling,
        rope_scaling_factor=cfg.rope_scaling_factor,
    )
    # GPTModel records the true vocabulary nowhere; the padded-column mask needs it.
    model.unpadded_vocab_size = cfg.vocab_size
    # megatron's torch norms allocate fp32 weights on the CPU, whatever params_dtype and the
    # device say (the local spec on a GPU machine without Transformer Engine). Casting here is
    # what megatron's Float16Module does to the module; that wrapper is not used because it
    # would also copy every last-stage output (three models' logits) to fp32.
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    return model.to(device=device, dtype=TORCH_DTYPES[cfg.dtype])


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Set the logits of padded vocabulary columns on this TP rank's shard to -inf, in place.

    ``logits`` is this rank's shard ``[..., V_padded / TP]``; rank r holds the global columns
    ``[r * V_padded/TP, (r + 1) * V_padded/TP)``. Returns ``logits`` (unchanged when the shard
    holds no padded column). In place is safe under autograd: the producing ops do not save
    their outputs, and the masked columns get zero gradient.
    """
    from megatron.core import parallel_state

    shard = logits.shape[-1]
    start = parallel_state.get_tensor_model_parallel_rank() * shard
    first_padded = vocab_size - start
    if first_padded < shard:
        logits[..., max(first_padded, 0) :].fill_(float("-inf"))
    return logits


_LAYER_KEY = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def full_state_dict_key(model, local_key: str) -> str:
    """The TP=1, PP=1 name of a local state-dict key (pipeline stages number layers locally)."""
    match = _LAYER_KEY.match(local_key)
    if match is None:
        if local_key == "output_layer.weight" and model.share_embeddings_and_output_weights:
            # A last stage without the embedding keeps its own copy of the tied weight.
            return "embedding.word_embeddings.weight"
        return local_key
    layer = model.decoder.layers[int(match.group(2))]
    return f"{match.group(1)}{layer.layer_number - 1}{match.group(3)}"


def _shard(full: torch.Tensor, param: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        return full
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    # With stride s the full tensor is s interleaved blocks (e.g. SwiGLU's [gate; up]) and each
    # rank owns the r-th slice of every block: split into s * tp pieces, take pieces r::tp.
    pieces = torch.chunk(full, stride * tp_size, dim=dim)
    return torch.cat(pieces[tp_rank::tp_size], dim=dim)


def load_full_state_dict(model, full_state_dict: Mapping[str, torch.Tensor]) -> None:
    """Copy an unsharded (TP=1, PP=1) state dict into this rank's shard of ``model``.

    Every local parameter and buffer must be found; vocabulary rows are padded with zeros or
    cut to this layout's padded vocabulary (padded rows never matter: their logits are masked).
    Keys ending in ``_extra_state`` (Transformer Engine metadata) are not copied.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with torch.no_grad():
        # keep_vars: the Parameter objects, which carry megatron's tensor-parallel attributes.
        for key, local in model.state_dict(keep_vars=True).items():
            if key.endswith("_extra_state"):
                continue
            full = full_state_dict[full_state_dict_key(model, key)]
            if getattr(local, "is_embedding_or_output_parameter", False):
                full = _resize_vocab_rows(full, model.vocab_size)
            shard = _shard(full, local, tp_rank, tp_size)
            if shard.shape != local.shape:
                raise ValueError(f"{key}: shard {tuple(shard.shape)} != local {tuple(local.shape)}")
            local.copy_(shard)


def _resize_vocab_rows(weight: torch.Tensor, padded_vocab: int) -> torch.Tensor:
    rows = weight.shape[0]
    if rows >= padded_vocab:
        return weight[:padded_vocab]
    return torch.cat([weight, weight.new_zeros(padded_vocab - rows, *weight.shape[1:])])
