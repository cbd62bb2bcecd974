"""Loss operators on vocab-sharded logits."""
from nemo_anchored.ops.anchored_kl import anchor_diagnostics, anchored_kl
from nemo_anchored.ops.sharded_losses import (dft_loss, reverse_kl, stm_keep_mask,
                                              token_cross_entropy)
from nemo_anchored.ops.vocab_parallel import fused_available

__all__ = ["anchored_kl", "anchor_diagnostics", "fused_available", "token_cross_entropy",
           "reverse_kl", "dft_loss", "stm_keep_mask"]
