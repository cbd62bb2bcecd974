"""Evaluation: greedy decoding and exact match (generate.py), the benchmarks and their command
(benchmarks.py), KL between a model and a reference (divergence.py), the experiment's table
(report.py)."""
from nemo_anchored.eval.generate import exact_match, greedy_generate

__all__ = ["exact_match", "greedy_generate"]
