"""Interval functions of lshe.stats against published values and a coverage simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lshe import stats


@pytest.mark.parametrize(
    "k, n, expected",
    [(0, 10, (0.0, 0.2775)), (5, 10, (0.2366, 0.7634)), (10, 10, (0.7225, 1.0)), (81, 263, (0.2553, 0.3662))],
)
def test_wilson_matches_known_values(k, n, expected):
    lo, hi = stats.wilson(k, n)
    assert lo == pytest.approx(expected[0], abs=1e-4)
    assert hi == pytest.approx(expected[1], abs=1e-4)


def test_normal_quantile():
    assert stats._z(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert stats._z(0.99) == pytest.approx(2.575829, abs=1e-6)


@pytest.mark.parametrize(
    "only_a, only_b, p", [(1, 6, 0.125), (0, 5, 0.0625), (3, 3, 1.0), (0, 0, 1.0), (2, 10, 0.0386)]
)
def test_mcnemar_exact_known_values(only_a, only_b, p):
    a = [1] * only_a + [0] * only_b + [1, 1, 0]  # concordant pairs change nothing
    b = [0] * only_a + [1] * only_b + [1, 1, 0]
    assert stats.mcnemar(a, b) == pytest.approx(p, abs=1e-4)


def test_bootstrap_covers_the_true_mean_about_95_percent():
    rng = np.random.default_rng(123)
    covered = 0
    for rep in range(200):
        sample = rng.exponential(1.0, size=60)  # skewed, true mean 1
        lo, hi = stats.bootstrap(sample, n_boot=400, seed=rep)
        covered += lo <= 1.0 <= hi
    assert 0.88 <= covered / 200 <= 0.99


def test_bootstrap_is_seeded_and_brackets_the_mean():
    x = np.arange(20) / 20
    assert stats.bootstrap(x, seed=1) == stats.bootstrap(x, seed=1)
    lo, hi = stats.bootstrap(x, seed=1)
    assert lo < x.mean() < hi


def test_bootstrap_ratio_is_corpus_perplexity():
    nll, tokens = [10.0, 20.0, 30.0], [10, 10, 10]
    lo, hi = stats.bootstrap_ratio(nll, tokens, n_boot=500)
    assert lo <= math.exp(60 / 30) <= hi
    assert lo >= math.exp(1.0) - 1e-9 and hi <= math.exp(3.0) + 1e-9


def test_paired_picks_the_test_by_score_kind():
    binary = stats.paired([1, 0, 1, 1], [1, 1, 1, 1], n_boot=200)
    assert binary["test"] == "mcnemar_exact" and binary["diff"] == pytest.approx(-0.25)
    assert binary["p_value"] == 1.0  # one discordant pair
    frac = stats.paired([0.5, 0.2, 0.9], [0.5, 0.4, 1.0], n_boot=200)
    assert frac["test"] == "paired_bootstrap" and frac["diff"] == pytest.approx(-0.1)
    assert frac["diff_ci"][0] <= -0.1 <= frac["diff_ci"][1]
    same = stats.paired([0.3, 0.4], [0.3, 0.4], n_boot=50)
    assert same["p_value"] == 1.0 and same["diff_ci"] == [0.0, 0.0]


def test_score_interval_method():
    assert stats.score_interval([1, 0, 1])["method"] == "wilson"
    assert stats.score_interval([1, 0.5, 1])["method"] == "bootstrap"


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="successes"):
        stats.wilson(11, 10)
    with pytest.raises(ValueError, match="same length"):
        stats.mcnemar([1], [1, 0])


def test_paired_bootstrap_is_forced_for_fractional_metrics_that_happen_to_be_0_or_1():
    result = stats.paired([1, 0, 1, 0], [1, 1, 1, 1], n_boot=200, binary=False)
    assert result["test"] == "paired_bootstrap" and result["diff"] == pytest.approx(-0.5)
