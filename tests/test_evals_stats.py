"""The gate's statistics against naive references, and their error rates on simulated data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from potluck.ops.evals.stats import (
    binom_cdf,
    bootstrap_means,
    clopper_pearson,
    mcnemar_exact,
    paired_test,
    tango_score,
    tango_z,
    verdict,
)


def _naive_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


def _naive_upper(k: int, n: int, alpha: float, step: float = 1e-5) -> float:
    """Largest p on a grid with P(X <= k | p) >= alpha (scan, no bisection)."""
    grid = np.arange(0, 1 + step, step)
    ok = [p for p in grid[::10] if _naive_cdf(k, n, p) >= alpha]
    start = ok[-1]
    fine = [p for p in np.arange(start, min(1, start + 10 * step) + step, step)]
    return max(p for p in fine if _naive_cdf(k, n, min(p, 1.0)) >= alpha)


def test_binomial_cdf_matches_the_sum_of_the_pmf() -> None:
    for n, k, p in [(10, 3, 0.3), (40, 20, 0.55), (7, 0, 0.9), (25, 24, 0.01)]:
        assert binom_cdf(k, n, p) == pytest.approx(_naive_cdf(k, n, p), abs=1e-12)


def test_clopper_pearson_matches_published_values_and_a_grid_scan() -> None:
    lo, hi = clopper_pearson(3, 10, 0.025)  # the classic 95 % interval of 3/10
    assert (round(lo, 4), round(hi, 4)) == (0.0667, 0.6525)
    assert clopper_pearson(0, 10, 0.025)[0] == 0.0
    assert clopper_pearson(10, 10, 0.025)[1] == 1.0
    for k, n in [(0, 5), (2, 9), (11, 20)]:
        assert clopper_pearson(k, n, 0.05)[1] == pytest.approx(_naive_upper(k, n, 0.05), abs=2e-5)
        # the lower bound of k/n is 1 - the upper bound of (n-k)/n
        assert clopper_pearson(k, n, 0.05)[0] == pytest.approx(
            1 - clopper_pearson(n - k, n, 0.05)[1], abs=1e-12
        )


def _pairs(b: int, c: int, same: int) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([0] * b + [1] * c + [1] * same, float)
    cand = np.array([1] * b + [0] * c + [1] * same, float)
    return base, cand


def test_mcnemar_with_zero_tolerance_is_the_exact_one_sided_sign_test() -> None:
    """pass at tolerance 0 <=> P(X >= b | m discordant, 1/2) < alpha (exact binomial test)."""
    for b in range(0, 13):
        for c in range(0, 13):
            if b + c == 0:
                continue
            base, cand = _pairs(b, c, 20)
            t = mcnemar_exact(base, cand, tolerance=0.0, alpha=0.05)
            m = b + c
            p_value = 1 - _naive_cdf(b - 1, m, 0.5) if b > 0 else 1.0
            assert (t.verdict == "pass") == (p_value < 0.05), (b, c, t)
            assert t.mean_diff == (b - c) / (m + 20)
            assert t.discordant == m


def test_mcnemar_interval_maps_the_binomial_interval_to_the_mean_difference() -> None:
    base, cand = _pairs(4, 10, 86)  # 100 items, candidate 6 points worse
    t = mcnemar_exact(base, cand, tolerance=0.01, alpha=0.05)
    lo, hi = clopper_pearson(4, 14, 0.05)
    assert (t.lo, t.hi) == ((2 * lo - 1) * 14 / 100, (2 * hi - 1) * 14 / 100)
    assert t.mean_diff == pytest.approx(-0.06)
    assert t.verdict == "inconclusive"  # the interval reaches past -0.01 on both sides
    assert verdict(-0.005, 0.02, 0.01) == "pass"
    assert verdict(-0.2, -0.02, 0.01) == "fail"


def test_bootstrap_matches_a_naive_loop_with_the_same_generator() -> None:
    d = np.array([0.3, -0.1, 0.0, 0.25, -0.4, 0.1, 0.05])
    means = bootstrap_means(d, seed=7, resamples=500)
    rng = np.random.default_rng(7)
    idx = rng.integers(0, d.size, size=(500, d.size))
    naive = [sum(d[j] for j in row) / d.size for row in idx]
    assert np.allclose(means, naive, rtol=0, atol=1e-15)
    # the same seed gives the same verdict, a constant shift gives a point interval
    base = np.linspace(0, 1, 50)
    t = paired_test(base, base - 0.05, tolerance=0.02, seed=3)
    assert (t.method, t.verdict) == ("paired-bootstrap", "fail")
    assert (t.lo, t.hi) == (pytest.approx(-0.05, abs=1e-15), pytest.approx(-0.05, abs=1e-15))
    assert paired_test(base, base + 0.3 * np.sin(base * 9), tolerance=0.02, seed=3) == (
        paired_test(base, base + 0.3 * np.sin(base * 9), tolerance=0.02, seed=3)
    )


def test_lower_is_better_flips_the_direction() -> None:
    base = np.linspace(1.0, 2.0, 40)
    t = paired_test(base, base + 0.5, tolerance=0.1, higher_is_better=False)
    assert (t.mean_diff, t.verdict) == (pytest.approx(-0.5), "fail")
    err_b, err_c = _pairs(0, 30, 70)[1], _pairs(0, 30, 70)[0]  # 0/1 errors: candidate better
    assert paired_test(err_b, err_c, tolerance=0.0, higher_is_better=False).verdict == "fail"
    assert paired_test(err_c, err_b, tolerance=0.0, higher_is_better=False).verdict == "pass"


def _simulate(rng: np.random.Generator, n: int, flip_down: float, flip_up: float) -> tuple:
    base = (rng.random(n) < 0.8).astype(float)
    cand = base.copy()
    r = rng.random(n)
    cand[(base == 1) & (r < flip_down)] = 0
    cand[(base == 0) & (r < flip_up)] = 1
    return base, cand


def test_tango_score_at_zero_margin_is_mcnemars_statistic() -> None:
    for b, c, n in [(9, 4, 100), (0, 7, 50), (12, 12, 40)]:
        assert tango_z(b, c, n, 0.0) == pytest.approx((b - c) / math.sqrt(b + c), abs=1e-12)
    # the statistic at the interval's ends is the normal quantile (inverted correctly)
    base, cand = _pairs(6, 14, 180)
    t = tango_score(base, cand, tolerance=0.03, alpha=0.05)
    assert tango_z(6, 14, 200, t.lo) == pytest.approx(1.6448536, abs=1e-6)
    assert tango_z(6, 14, 200, t.hi) == pytest.approx(-1.6448536, abs=1e-6)
    assert (t.method, t.mean_diff, t.verdict) == ("tango-score", -0.04, "inconclusive")
    assert paired_test(base, cand, tolerance=0.03).method == "tango-score"
    assert paired_test(base, cand, tolerance=0.0).method == "mcnemar-exact"


def _rates(true_diff: float, tol: float, reps: int = 300, n: int = 150) -> dict[str, float]:
    """Verdict frequencies of the gate's 0/1 test with 0/1 outcomes, accuracy 0.8, 10 % of the
    wrong items flipping right, and enough right ones flipping wrong for ``true_diff``."""
    rng = np.random.default_rng(2024)
    flip_down = (0.2 * 0.1 - true_diff) / 0.8
    counts = {"pass": 0, "fail": 0, "inconclusive": 0}
    for _ in range(reps):
        b, c = _simulate(rng, n, flip_down, 0.1)
        counts[paired_test(b, c, tolerance=tol, alpha=0.05).verdict] += 1
    return {k: v / reps for k, v in counts.items()}


def test_simulated_error_rates_of_the_binary_test() -> None:
    """The documented level: a regression as large as the tolerance passes at most 5 % of the
    time (plus Monte-Carlo slack: 300 runs, sd 1.3 %); no difference rarely fails."""
    at_margin = _rates(true_diff=-0.05, tol=0.05)
    beyond = _rates(true_diff=-0.10, tol=0.05)
    none = _rates(true_diff=0.0, tol=0.05)
    assert at_margin["pass"] <= 0.05 + 0.03
    assert beyond["pass"] <= 0.01
    assert none["fail"] <= 0.01
    assert none["pass"] > 0.2  # n=150 gives some power at a 5-point margin
    # the exact frequencies (fixed seed): pass/fail out of 300
    assert (round(at_margin["pass"] * 300), round(at_margin["fail"] * 300)) == (16, 19)
    assert (round(beyond["pass"] * 300), round(beyond["fail"] * 300)) == (1, 172)
    assert (round(none["pass"] * 300), round(none["fail"] * 300)) == (256, 0)


def test_simulated_false_pass_rate_of_the_bootstrap() -> None:
    rng = np.random.default_rng(5)
    passes = 0
    for seed in range(150):
        base = rng.normal(0.5, 0.2, 80)
        cand = base - 0.05 + rng.normal(0, 0.1, 80)  # regression exactly at the tolerance
        passes += paired_test(base, cand, tolerance=0.05, seed=seed).verdict == "pass"
    # 12 of 150 (8 %, Monte-Carlo sd 1.8 %); the same simulation with 1000 runs passes 4.1 %
    assert passes == 12
