"""Distributed setup and pipeline schedules for megatron-core, on CPU (gloo) and GPU (NCCL).

Importing this package installs the CPU shims (a no-op where CUDA is available) before anything
imports megatron-core, because megatron-core 0.19 cannot even be imported on a CPU-only machine
without them.
"""

from nemo_anchored.parallel.cpu_compat import install_cpu_compat

install_cpu_compat()
