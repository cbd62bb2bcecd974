"""megatron-core GPT models and the policy + frozen-models stack used by Anchored Learning."""

# Installs the CPU shims before megatron-core is imported (see nemo_anchored.parallel).
import nemo_anchored.parallel  # noqa: F401
