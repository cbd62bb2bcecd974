"""Positions and packed rows for megatron-core's GPTModel: rotary embeddings that follow the
position ids, and a packed row's block-diagonal mask turned into Transformer Engine's THD
packed-sequence parameters.

megatron-core 0.16.1's GPTModel computes its rotary frequencies from the sequence length
alone, ``[s, 1, 1, d]`` for positions 0..s-1 of every row; ``position_ids`` feed only learned
absolute embeddings. A packed row (data/packing.py) restarts its positions at each example,
so ``PositionalGPTModel`` gathers the frequencies at the position ids instead, ``[s, b, 1, d]``,
which megatron's unfused rotary path (``_apply_rotary_pos_emb_bshd``, the default:
``apply_rope_fusion`` is off) broadcasts over the heads, as it does for its multimodal rope's
per-row frequencies. For ids 0..s-1 the gathered frequencies are the same numbers, so an
unpacked batch computes exactly what GPTModel computes. Incremental decoding
(``inference_context``) keeps megatron's own positions.

With Transformer Engine's attention the model is handed the same mask as on the local layer
spec, and turns it into megatron's THD ``PackedSeqParams`` (``cu_seqlens`` at each segment
start), with which TE runs a padding-causal attention per segment and megatron's rotary
embedding restarts at each ``cu_seqlens`` boundary itself. megatron's THD layout holds one row
per micro-batch. This path is written, not run: no machine this was developed on has TE.
"""
from __future__ import annotations

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams


class PositionalGPTModel(GPTModel):
    """``GPTModel`` whose rotary embedding follows ``position_ids`` (see the module's
    docstring), and which runs a packed row's ``attention_mask`` as THD packed sequences when
    its attention is Transformer Engine's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.thd_packing = _uses_transformer_engine_attention(self)

    def forward(self, input_ids, position_ids, attention_mask, *args, **kwargs):
        if self.thd_packing and attention_mask is not None \
                and kwargs.get("packed_seq_params") is None:
            kwargs["packed_seq_params"] = thd_packed_seq_params(attention_mask)
            attention_mask = None
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def _preprocess(self, input_ids, position_ids, **kwargs):
        output = super()._preprocess(input_ids=input_ids, position_ids=position_ids, **kwargs)
        rotary = output[1]
        if (rotary is None or position_ids is None or kwargs.get("inference_context") is not None
                or kwargs.get("packed_seq_params") is not None):
            return output
        return (output[0], rotary_at_positions(rotary, position_ids), *output[2:])


def rotary_at_positions(rotary: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """The rotary frequencies ``[S, 1, 1, d]`` (positions 0..S-1) gathered at ``position_ids``
    ``[b, s]``: ``[s, b, 1, d]``. Ids must be below S (an index error otherwise; a packed
    row's ids are below its length, S)."""
    return rotary[:, 0, 0, :][position_ids.t().to(rotary.device)].unsqueeze(2)


def thd_packed_seq_params(attention_mask: torch.Tensor) -> PackedSeqParams:
    """megatron's THD ``PackedSeqParams`` for one packed row's block-diagonal causal mask
    (bool ``[1, 1, s, s]``, True: not attended; data/packing.py ``block_causal_mask``): a
    segment starts at 0 and wherever a position does not attend to the one before it."""
    if attention_mask.shape[0] != 1:
        raise ValueError(f"packed rows under Transformer Engine need trainer.micro_batch_size=1 "
                         f"(megatron's THD layout holds one row), got "
                         f"{attention_mask.shape[0]} rows")
    s = attention_mask.shape[-1]
    blocked_from_previous = attention_mask[0, 0].diagonal(offset=-1)  # [i, i - 1], i >= 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long, device=attention_mask.device),
                        torch.nonzero(blocked_from_previous).flatten() + 1])
    ends = torch.cat([starts[1:], starts.new_tensor([s])])
    cu_seqlens = torch.cat([starts, starts.new_tensor([s])]).to(torch.int32)
    longest = int((ends - starts).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _uses_transformer_engine_attention(model: torch.nn.Module) -> bool:
    from megatron.core.extensions.transformer_engine import HAVE_TE

    if not HAVE_TE:  # its TE classes are then placeholders that isinstance cannot take
        return False
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return any(isinstance(module, TEDotProductAttention) for module in model.modules())
