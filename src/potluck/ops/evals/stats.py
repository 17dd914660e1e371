"""The gate's statistics: paired non-inferiority tests on per-item outcomes. Pure numpy + math.

Differences are always taken in the "better" direction (``candidate - base`` for metrics where
higher is better, ``base - candidate`` where lower is better), so a regression is a negative
difference and the non-inferiority margin is ``-tolerance``.

* 0/1 outcomes, tolerance 0: the exact McNemar test. Conditional on the ``m`` discordant items,
  the number ``b`` the candidate gets right and the base wrong is Binomial(m, theta); the
  Clopper-Pearson interval of theta maps to the mean difference as ``(2 theta - 1) m / n``
  (exact for the null hypothesis of no difference, theta = 1/2).
* 0/1 outcomes, tolerance > 0: Tango's (1998) score test for a paired difference of
  proportions with a margin, inverted into an interval (the conditional interval above is not
  valid at a margin: its false-pass rate at the margin was 9-10 % at a nominal 5 % in
  simulation; Tango's stays at 4-5.5 %).
* Other outcomes: a paired bootstrap of the mean difference (percentile interval widened by
  sqrt(n/(n-1)), the bootstrap's known shrinkage), with an explicit seed so the verdict is
  reproducible.

Verdicts at one-sided level ``alpha`` (two-sided ``1 - 2 alpha`` interval ``[lo, hi]``):
``pass`` when ``lo > -tolerance`` (non-inferior), ``fail`` when ``hi < -tolerance`` (worse than
the tolerance), ``inconclusive`` otherwise. The minimum detectable effect is the regression
beyond the tolerance the test detects with 80 % power: ``(z_(1-alpha) + z_0.8) * se``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

POWER = 0.8
BOOTSTRAP_RESAMPLES = 2000


def _log_pmf(k: int, n: int, p: float) -> float:
    if p <= 0.0:
        return 0.0 if k == 0 else -math.inf
    if p >= 1.0:
        return 0.0 if k == n else -math.inf
    return (
        math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
        + k * math.log(p) + (n - k) * math.log1p(-p)
    )  # fmt: skip


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return min(1.0, math.fsum(math.exp(_log_pmf(i, n, p)) for i in range(k + 1)))


def _bisect(f: Any, target: float) -> float:
    """The p in [0, 1] where the decreasing function ``f`` crosses ``target``."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """Exact interval of a binomial proportion with ``alpha`` in each tail (k of n)."""
    if n <= 0:
        return 0.0, 1.0
    lo = 0.0 if k == 0 else _bisect(lambda p: binom_cdf(k - 1, n, p), 1.0 - alpha)
    hi = 1.0 if k == n else _bisect(lambda p: binom_cdf(k, n, p), alpha)
    return lo, hi


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of a candidate with a base on the same items."""

    method: str
    n: int
    mean_diff: float
    lo: float
    hi: float
    se: float
    alpha: float
    tolerance: float
    verdict: str
    mde: float
    discordant: int | None = None
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def is_binary(values: np.ndarray) -> bool:
    """Every outcome is 0 or 1."""
    return bool(np.all((values == 0) | (values == 1)))


def verdict(lo: float, hi: float, tolerance: float) -> str:
    """``pass`` / ``fail`` / ``inconclusive`` from the interval of the difference."""
    if lo > -tolerance:
        return "pass"
    if hi < -tolerance:
        return "fail"
    return "inconclusive"


def mde(se: float, alpha: float) -> float:
    """Minimum detectable effect at ``alpha`` (one-sided) with 80 % power."""
    z = NormalDist()
    return (z.inv_cdf(1 - alpha) + z.inv_cdf(POWER)) * se


def mcnemar_exact(
    base: np.ndarray, cand: np.ndarray, tolerance: float, alpha: float = 0.05
) -> PairedTest:
    """Exact conditional interval for paired 0/1 outcomes (``cand`` better = positive)."""
    n = int(base.size)
    b = int(np.sum((cand == 1) & (base == 0)))
    c = int(np.sum((cand == 0) & (base == 1)))
    m = b + c
    t_lo, t_hi = clopper_pearson(b, m, alpha)
    lo, hi = (2 * t_lo - 1) * m / n, (2 * t_hi - 1) * m / n
    d = (cand - base).astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    se = max(se, (hi - lo) / (2 * NormalDist().inv_cdf(1 - alpha)))
    return PairedTest(
        "mcnemar-exact", n, (b - c) / n, lo, hi, se, alpha, tolerance,
        verdict(lo, hi, tolerance), mde(se, alpha), discordant=m,
    )  # fmt: skip


def tango_z(b: int, c: int, n: int, delta: float) -> float:
    """Tango's score statistic for H0: (b - c) / n = ``delta`` (``b``: items only the candidate
    gets right, ``c``: only the base); positive when the candidate is better than ``delta``."""
    a2 = 2 * n
    b2 = (2 * n - b + c) * delta - (b + c)
    c2 = -c * delta * (1 - delta)
    p21 = (-b2 + math.sqrt(max(b2 * b2 - 4 * a2 * c2, 0.0))) / (2 * a2)
    var = n * (2 * p21 + delta * (1 - delta))
    num = b - c - n * delta
    if var <= 0:
        return math.copysign(math.inf, num) if num else 0.0
    return num / math.sqrt(var)


def _root(f: Any, target: float) -> float:
    """The delta in [-1, 1] where the decreasing ``f`` crosses ``target``."""
    lo, hi = -1.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if f(mid) > target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tango_score(
    base: np.ndarray, cand: np.ndarray, tolerance: float, alpha: float = 0.05
) -> PairedTest:
    """Tango's score interval of the paired difference of 0/1 outcomes."""
    n = int(base.size)
    b = int(np.sum((cand == 1) & (base == 0)))
    c = int(np.sum((cand == 0) & (base == 1)))
    z = NormalDist().inv_cdf(1 - alpha)
    lo = _root(lambda d: tango_z(b, c, n, d), z)
    hi = _root(lambda d: tango_z(b, c, n, d), -z)
    d = (cand - base).astype(np.float64)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    se = max(se, (hi - lo) / (2 * z))  # no discordant item: the interval still has a width
    return PairedTest(
        "tango-score", n, (b - c) / n, lo, hi, se, alpha, tolerance,
        verdict(lo, hi, tolerance), mde(se, alpha), discordant=b + c,
    )  # fmt: skip


def bootstrap_means(d: np.ndarray, seed: int, resamples: int = BOOTSTRAP_RESAMPLES) -> np.ndarray:
    """Means of ``resamples`` resamples of ``d`` with replacement (numpy PCG64 from ``seed``).

    Drawn in blocks so memory stays at about 8 MiB whatever ``len(d)``.
    """
    rng = np.random.default_rng(seed)
    n = d.size
    out = np.empty(resamples)
    block = max(1, (1 << 20) // max(n, 1))
    for start in range(0, resamples, block):
        k = min(block, resamples - start)
        idx = rng.integers(0, n, size=(k, n))
        out[start : start + k] = d[idx].mean(axis=1)
    return out


def paired_bootstrap(
    base: np.ndarray, cand: np.ndarray, tolerance: float, alpha: float = 0.05, seed: int = 0
) -> PairedTest:
    """Percentile interval of the mean paired difference from a seeded bootstrap."""
    d = (cand - base).astype(np.float64)
    n = int(d.size)
    means = bootstrap_means(d, seed)
    centre = float(d.mean())
    # the bootstrap's spread is sqrt((n-1)/n) of the unbiased one: widen it back
    widen = math.sqrt(n / (n - 1)) if n > 1 else 1.0
    q = np.quantile(means, [alpha, 1 - alpha])
    lo, hi = (centre + widen * (float(x) - centre) for x in q)
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return PairedTest(
        "paired-bootstrap", n, float(d.mean()), lo, hi, se, alpha, tolerance,
        verdict(lo, hi, tolerance), mde(se, alpha), seed=seed,
    )  # fmt: skip


def paired_test(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    tolerance: float,
    higher_is_better: bool = True,
    alpha: float = 0.05,
    seed: int = 0,
) -> PairedTest:
    """The gate's test: for 0/1 outcomes exact McNemar (tolerance 0) or Tango's score test,
    a paired bootstrap otherwise.

    ``base`` and ``cand`` hold one outcome per item, in the same item order.
    """
    b, c = np.asarray(base, np.float64), np.asarray(cand, np.float64)
    binary = is_binary(b) and is_binary(c)
    if not higher_is_better:
        b, c = (1 - b, 1 - c) if binary else (-b, -c)
    if binary:
        test = mcnemar_exact if tolerance == 0 else tango_score
        return test(b, c, tolerance, alpha)
    return paired_bootstrap(b, c, tolerance, alpha, seed)


def mean_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean of per-item outcomes and its standard error (0 for a single item)."""
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return math.nan, math.nan
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else 0.0
    return float(v.mean()), se
