"""The training stage: trainer, method losses, metrics and checkpoints."""
