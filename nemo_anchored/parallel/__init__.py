"""Distributed setup, pipeline schedules and the megatron-core patches, on CPU (gloo) and GPU
(NCCL). ``distributed.init_process_group`` installs the patches (``megatron_compat``)."""
