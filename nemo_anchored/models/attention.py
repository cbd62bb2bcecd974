"""Core attention on ``torch.nn.functional.scaled_dot_product_attention``, for the local spec.

A drop-in for megatron-core's ``DotProductAttention`` (the ``core_attention`` of the local
layer spec): the same constructor, the same forward signature, the same result. megatron's
version materialises the scores and probabilities ``[b, heads/TP, s, s]`` in the model's dtype
(plus an fp32 copy for the softmax under bf16), which at 4k-8k tokens dominates the memory of
a small model. PyTorch's fused kernels never form that matrix: flash (causal, no mask) keeps a
tile of it in on-chip memory, the memory-efficient kernel takes an explicit mask.

Per TP rank, with megatron's layouts: query ``[sq, b, heads/TP, d]``, key and value
``[sk, b, groups/TP, d]``, output ``[sq, b, heads/TP * d]``.

- **Masks.** megatron's convention: ``attention_mask`` is None (causal, from the layer's mask
  type) or a bool tensor broadcastable to ``[b, 1, sq, sk]``, True where a query must NOT
  attend, that already contains the causality (a packed batch's block-diagonal causal mask).
  As in megatron, a given mask replaces the causal one; every query must attend to at least
  one key (itself, in a causal mask): a fully masked row gets a uniform softmax in megatron
  (its -10000 fill) and NaN or zeros from the fused kernels. megatron masks with -10000 after
  scaling, the kernels with -inf: the same probabilities in fp32 (exp underflows to 0 either
  way) for scores far below 10000.
- **Grouped-query attention.** Without a mask the heads share keys through ``enable_gqa``
  (flash supports it, no copy); with a mask the keys and values are expanded first, because the
  memory-efficient kernel accepts grouped heads only in recent PyTorch versions and otherwise
  the dispatcher falls back to the math kernel, which materialises the scores.
- **Scale.** ``softmax_scale`` (config) or 1/sqrt(kv_channels), as megatron.
  ``apply_query_key_layer_scaling`` divides megatron's scores by the layer number before an
  fp16 matmul and multiplies them back in the fp32 softmax, a guard against fp16 overflow; the
  fused kernels accumulate scores in fp32, so the product alone (unchanged) is applied.
- **Dropout.** ``attention_dropout`` in training, drawn inside the tensor-parallel RNG
  tracker's fork as megatron does (without sequence parallelism), so each TP rank drops with its
  own stream for its own heads and recomputation redraws the same mask. On the CPU, PyTorch's
  math kernel draws the very mask megatron's ``nn.Dropout`` draws (tests/layers_worker.py
  checks it); the GPU kernels draw theirs in-kernel from the same stream: the same keep
  probability and 1/(1-p) scaling, equal in distribution, not elementwise.

Not supported, refused when built: context parallelism, sliding-window attention, softmax
types other than vanilla, attention bias and THD packed sequences (``packed_seq_params``:
Transformer Engine's format; the local spec takes the block-diagonal mask instead).

The module has no parameters or buffers: state dicts and checkpoints are the same whichever
core attention a model uses.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """megatron's ``DotProductAttention`` on PyTorch's fused attention kernels (module
    docstring)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection=None):
        super().__init__(config=config)
        unsupported = {
            "context_parallel_size > 1": config.context_parallel_size != 1,
            "sliding-window attention (window_size)": is_layer_window_attention(
                config.window_size, config.window_attn_skip_freq, layer_number),
            f"softmax_type={config.softmax_type!r}": config.softmax_type != "vanilla",
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise ValueError(f"SDPA core attention does not support {', '.join(refused)}; "
                             "use model.attention=te or local")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.attn_mask_type = attn_mask_type
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.scale = 1.0 / math.sqrt(config.kv_channels) if softmax_scale is None \
            else softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None \
            else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise ValueError("packed_seq_params (THD packed sequences) needs Transformer "
                             "Engine; the local spec takes a block-diagonal attention_mask")
        if attention_bias is not None:
            raise ValueError("SDPA core attention takes no attention_bias")
        sq, batch, sk = query.shape[0], query.shape[1], key.shape[0]
        # As megatron's: the layer's mask type decides (the argument is ignored); no causal
        # mask for one query (a decoding step over a KV cache attends to every cached key),
        # and a non-square causal one is refused.
        causal = attention_mask is None and self.attn_mask_type == AttnMaskType.causal and sq > 1
        if causal and sq != sk:
            raise ValueError(f"causal attention needs as many queries as keys ({sq} != {sk})")
        # [s, b, n, d] -> [b, n, s, d]: views, the kernels need only a unit last stride.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        allowed = None
        if attention_mask is not None:
            allowed = ~attention_mask  # SDPA's bool mask marks what IS attended
            if self.heads != self.groups:
                k, v = (t.repeat_interleave(self.heads // self.groups, dim=1) for t in (k, v))
        dropout = self.dropout if self.training else 0.0
        with self._rng_fork(dropout):
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, is_causal=causal,
                scale=self.scale, enable_gqa=self.heads != self.groups and allowed is None)
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, batch, -1)

    def _rng_fork(self, dropout: float):
        # megatron's DotProductAttention draws attention dropout in the model-parallel stream
        # (different per TP rank) unless sequence parallelism already gives ranks distinct
        # inputs; a fork is pure overhead when nothing is drawn.
        if dropout > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()
