"""Loss operators on vocab-sharded logits."""
from nemo_anchored.ops.anchored_kl import anchor_diagnostics, anchored_kl, fused_available

__all__ = ["anchored_kl", "anchor_diagnostics", "fused_available"]
