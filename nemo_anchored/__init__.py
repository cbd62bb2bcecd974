"""nemo_anchored: Anchored Learning fine-tuning on megatron-core."""

__version__ = "0.1.0"
