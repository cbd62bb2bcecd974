"""megatron-core GPT models and the policy + frozen-models stack used by Anchored Learning."""
