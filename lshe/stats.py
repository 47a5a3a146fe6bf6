"""Uncertainty of a score: confidence intervals and the paired comparison with the full cache.

Plain numpy, seeded, no scipy. Which interval a score gets:

* **accuracy-like scores** whose per-example values are all 0 or 1: the Wilson score interval
  (`wilson`), which stays inside [0, 1] and is not degenerate at 0/n or n/n;
* **fractional per-example scores** (ROUGE-L, RULER's string_match_all, agreement): the percentile
  bootstrap of the mean over examples (`bootstrap`);
* **perplexity**: the percentile bootstrap over texts of exp(sum NLL / sum tokens) (`bootstrap_ratio`):
  texts are resampled whole, so the interval reflects how much the score depends on which texts were
  drawn, not the token-level noise (tokens of one text are not independent).

The paired comparison of a policy with the full cache on the same examples (`paired`): the exact
McNemar test for 0/1 scores (a two-sided binomial test on the discordant pairs), else the paired
bootstrap of the difference (examples resampled together) with a two-sided bootstrap p-value. The
intervals are at 95% unless asked otherwise; every bootstrap records its seed and resample count.

What an interval cannot say: it covers the sampling of *examples* from the task's generator, at a
fixed model, seed of the task and prompt format. With few examples (10) any interval is wide; with
a deterministic task generator, examples are not a random sample of a natural distribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
N_BOOT = 2000


def _z(level: float) -> float:
    """The two-sided normal quantile for ``level`` (1.959964 at 0.95), by bisection on erf."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    target = 1.0 - (1.0 - level) / 2.0
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if 0.5 * (1.0 + math.erf(mid / math.sqrt(2.0))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def wilson(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a proportion ``successes / n`` (n >= 1)."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson needs 0 <= successes <= n and n >= 1, got {successes}/{n}")
    z = _z(level)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _percentile(samples: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(samples, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ValueError("the bootstrap needs at least one example")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap(
    values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (examples resampled with replacement)."""
    x = np.asarray(values, dtype=np.float64)
    means = x[_indices(len(x), n_boot, seed)].mean(axis=1)
    return _percentile(means, level)


def bootstrap_ratio(
    numerators: Sequence[float],
    denominators: Sequence[float],
    transform=math.exp,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> tuple[float, float]:
    """Percentile bootstrap of ``transform(sum(num) / sum(den))`` over examples (perplexity: NLL, tokens)."""
    num, den = np.asarray(numerators, np.float64), np.asarray(denominators, np.float64)
    idx = _indices(len(num), n_boot, seed)
    ratio = num[idx].sum(axis=1) / np.maximum(den[idx].sum(axis=1), 1.0)
    return _percentile(np.vectorize(transform)(ratio), level)


def is_binary(values: Sequence[float]) -> bool:
    """Every value is exactly 0 or 1."""
    return len(values) > 0 and all(v in (0, 1) for v in values)


def mcnemar(a: Sequence[float], b: Sequence[float]) -> float:
    """Exact two-sided McNemar p-value of paired 0/1 outcomes ``a`` and ``b`` (binomial on discordant pairs)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes must have the same length, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0**n
    return min(1.0, 2.0 * tail)


def paired(
    policy: Sequence[float],
    full: Sequence[float],
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
    perplexity_tokens: Sequence[float] | None = None,
    binary: bool | None = None,
) -> dict:
    """Policy against the full cache on the same examples: ``{test, diff, diff_ci, p_value}``.

    ``diff`` is policy minus full. For perplexity, ``policy`` and ``full`` are per-text NLL sums and
    ``perplexity_tokens`` the scored tokens; the difference is of the corpus perplexities. ``binary``:
    whether the scores are 0/1 outcomes (McNemar); None decides from the values, False forces the
    paired bootstrap (a fractional metric whose examples all happened to score 0 or 1).
    """
    x, y = np.asarray(policy, np.float64), np.asarray(full, np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) == 0:
        raise ValueError("paired needs two non-empty score lists of the same length")
    idx = _indices(len(x), n_boot, seed)
    if perplexity_tokens is not None:
        t = np.asarray(perplexity_tokens, np.float64)
        tokens = np.maximum(t[idx].sum(axis=1), 1.0)
        diffs = np.exp(x[idx].sum(axis=1) / tokens) - np.exp(y[idx].sum(axis=1) / tokens)
        diff = math.exp(x.sum() / max(t.sum(), 1.0)) - math.exp(y.sum() / max(t.sum(), 1.0))
        test = "paired_bootstrap"
    else:
        diffs = (x - y)[idx].mean(axis=1)
        diff = float((x - y).mean())
        both_binary = is_binary(list(x)) and is_binary(list(y))
        test = "mcnemar_exact" if both_binary and binary is not False else "paired_bootstrap"
    if test == "mcnemar_exact":
        p_value = mcnemar(list(x), list(y))
    elif not np.any(diffs != 0):
        p_value = 1.0  # every resample shows no difference
    else:
        p_value = min(1.0, 2.0 * min(float((diffs <= 0).mean()), float((diffs >= 0).mean())))
    return {"test": test, "diff": float(diff), "diff_ci": list(_percentile(diffs, level)), "p_value": p_value}


def score_interval(
    values: Sequence[float], n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict:
    """``{ci, method}`` of the mean of per-example scores: Wilson when all are 0/1, else bootstrap."""
    if is_binary(values):
        return {"ci": list(wilson(int(sum(values)), len(values), level)), "method": "wilson"}
    return {"ci": list(bootstrap(values, n_boot, seed, level)), "method": "bootstrap"}
