"""Evaluation: greedy decoding and exact-match accuracy (TP=1, PP=1 models)."""
from nemo_anchored.eval.generate import exact_match, greedy_generate

__all__ = ["exact_match", "greedy_generate"]
