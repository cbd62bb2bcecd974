"""Whether a general metric has signal for a model: the BASE model must be clearly above the
metric's chance level (0.25 for 4-choice MMLU accuracy, 0 for exact match), else a fine-tuned
model's score on it says nothing about a general skill kept or lost.

The rule: the lower end of a two-sided 95% interval for the base's mean per-question score must
lie above chance. The interval:

- scores that are all 0 or 1 (a proportion): Wilson's score interval, which keeps its coverage
  near 0 and 1 and at small n, where the normal (Wald) interval collapses to a point at p = 0 or
  1 and under-covers;
- other (continuous) scores, such as the log-probability of the right letter: Student's t
  interval on the mean, with the sample standard deviation. It is deterministic and, by the
  central limit theorem, close to its nominal coverage for the hundreds of questions an
  evaluation has, also for skewed scores; a bootstrap interval would add a seed and a thousand
  resamples for the same answer there, and its percentile form under-covers at small n. The
  t quantile comes from the Cornish-Fisher expansion (Abramowitz & Stegun 26.7.5), within a
  relative 1e-5 of the exact quantile from 9 degrees of freedom on: hence at least
  ``MIN_CONTINUOUS`` scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence, Tuple

LEVEL = 0.95
MIN_CONTINUOUS = 10


@dataclass(frozen=True)
class Signal:
    """The base's mean score, its 95% interval ``[low, high]`` (``method``: wilson or t) over
    ``n`` questions, and the chance level it is judged against."""

    mean: float
    low: float
    high: float
    n: int
    chance: float
    method: str

    @property
    def above_chance(self) -> bool:
        """The metric has signal: the interval excludes chance, from above."""
        return self.low > self.chance


def base_signal(scores: Sequence[float], chance: float) -> Signal:
    """The signal rule (module docstring) on the base model's per-question ``scores``."""
    scores = [float(s) for s in scores]
    if not scores:
        raise ValueError("base_signal: no scores")
    if not all(math.isfinite(s) for s in scores) or not math.isfinite(chance):
        raise ValueError("base_signal: the scores and the chance level must be finite numbers")
    n, mean = len(scores), math.fsum(scores) / len(scores)
    z = NormalDist().inv_cdf(0.5 + LEVEL / 2)
    if all(s in (0.0, 1.0) for s in scores):
        if not 0.0 <= chance <= 1.0:
            raise ValueError(f"base_signal: chance level {chance} of a 0/1 score is outside "
                             "[0, 1]")
        low, high = wilson_interval(mean, n, z)
        return Signal(mean, low, high, n, chance, "wilson")
    if n < MIN_CONTINUOUS:
        raise ValueError(f"base_signal: {n} continuous scores; the t interval needs at least "
                         f"{MIN_CONTINUOUS}")
    sd = math.sqrt(math.fsum((s - mean) ** 2 for s in scores) / (n - 1))
    half = t_quantile(z, n - 1) * sd / math.sqrt(n)
    return Signal(mean, mean - half, mean + half, n, chance, "t")


def wilson_interval(p: float, n: int, z: float) -> Tuple[float, float]:
    """Wilson's score interval for a proportion ``p`` of ``n`` trials at normal quantile ``z``."""
    shrink = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / shrink
    half = z / shrink * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


def t_quantile(z: float, dof: int) -> float:
    """Student's t quantile with ``dof`` degrees of freedom at the level of the normal quantile
    ``z``: the Cornish-Fisher expansion in 1/dof to its fourth term."""
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    g4 = (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3 + g4 / dof ** 4
