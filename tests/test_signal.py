"""The general-metric signal rule (eval/signal.py) on hand-made scores: Wilson intervals against
Newcombe's published table, the t interval against a hand computation with a tabulated t
quantile, and cases on both sides of the rule."""
import math

import pytest

from nemo_anchored.eval.signal import base_signal


def proportion(correct: int, n: int):
    return [1] * correct + [0] * (n - correct)


# Newcombe (1998), "Two-sided confidence intervals for the single proportion: comparison of
# seven methods", Statistics in Medicine 17:857-872, Table II, method 3 (Wilson score).
NEWCOMBE = [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605), (0, 20, 0.0, 0.1611),
            (1, 29, 0.0061, 0.1718)]


@pytest.mark.parametrize("correct, n, low, high", NEWCOMBE)
def test_wilson_interval_matches_newcombes_table(correct, n, low, high):
    signal = base_signal(proportion(correct, n), chance=0.0)
    assert signal.method == "wilson" and signal.n == n
    assert signal.mean == pytest.approx(correct / n, rel=1e-12)
    assert (round(signal.low, 4), round(signal.high, 4)) == (low, high)


def test_proportions_on_both_sides_of_the_rule():
    # 4-choice accuracy 81/263 = 0.308: the interval's low end 0.2553 clears 0.25, barely.
    assert base_signal(proportion(81, 263), chance=0.25).above_chance
    # Nearly the same accuracy on 100 questions does not: [0.228, 0.406] includes 0.25.
    assert not base_signal(proportion(31, 100), chance=0.25).above_chance
    # Exact match: any correct answer puts Wilson's low end above 0 ...
    assert base_signal(proportion(1, 29), chance=0.0).above_chance
    # ... none does not (the interval starts at 0 itself), nor does a below-chance accuracy.
    assert not base_signal(proportion(0, 20), chance=0.0).above_chance
    assert not base_signal(proportion(15, 148), chance=0.25).above_chance


def test_continuous_scores_t_interval_by_hand():
    # Log-probabilities of the right letter: mean -0.8, squared deviations summing to 0.60.
    scores = [-0.9, -1.2, -0.4, -1.0, -0.7, -1.1, -0.5, -0.8, -0.6, -0.8]
    sd = math.sqrt(0.60 / 9)
    half = 2.262157 * sd / math.sqrt(10)  # t(0.975, 9 dof), from a printed table
    signal = base_signal(scores, chance=math.log(0.25))  # a uniform guess among 4 letters
    assert signal.method == "t" and signal.mean == pytest.approx(-0.8, abs=1e-12)
    assert signal.low == pytest.approx(-0.8 - half, abs=1e-5)
    assert signal.high == pytest.approx(-0.8 + half, abs=1e-5)
    assert signal.above_chance  # -0.985 > log(0.25) = -1.386
    assert not base_signal(scores, chance=-0.9).above_chance  # -0.985 < -0.9 < the mean


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="no scores"):
        base_signal([], chance=0.25)
    with pytest.raises(ValueError, match="finite"):
        base_signal([1, 0, float("nan")], chance=0.25)
    with pytest.raises(ValueError, match=r"chance level 1.5 .* outside \[0, 1\]"):
        base_signal(proportion(3, 10), chance=1.5)
    with pytest.raises(ValueError, match="9 continuous scores; .* at least 10"):
        base_signal([0.5] * 9, chance=0.0)
