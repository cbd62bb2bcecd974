"""Checkpoints: the on-disk format (``format``: no torch, readable from every layer), the
collective save/load on megatron-core's dist_checkpointing (``sharded``), and the check of a
checkpoint's tensor index against its files and the model (``shapes``)."""
