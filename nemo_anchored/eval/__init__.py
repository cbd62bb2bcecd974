"""Evaluation: greedy decoding and exact match (generate.py), the benchmarks (benchmarks.py, with
their data in loaders.py, scorers in scoring.py and model adapters in adapters.py), KL between a
model and a reference (divergence.py), the experiment's table (report.py).

Nothing is imported here: the command line reads the benchmarks' settings without loading torch.
"""
