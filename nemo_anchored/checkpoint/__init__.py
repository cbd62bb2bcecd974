"""Checkpoints: the on-disk format (``format``: no torch, readable from every layer) and the
collective save/load on megatron-core's dist_checkpointing (``sharded``)."""
