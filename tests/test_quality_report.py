"""bench.quality.report's aggregation over seeds, on hand-made results with known answers.

References: means, sample standard deviations and gain-kept fractions worked out by hand below.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench.quality import report

X_A = (0.7, 0.8, 0.9)  # merge x on task A per seed; B stays 0.8
Y_B = (0.9, 0.9, 0.6)  # merge y on task B per seed; A stays 0.75


def _run(i: int) -> dict[str, Any]:
    """Task A: probe 0.5, fine-tune 0.9 (gain 0.4, counts); B: probe 0.8, fine-tune 0.82 (not)."""
    return {
        "probe": {"A": {"test_acc": 0.5}, "B": {"test_acc": 0.8}},
        "individual": {"A": 0.9, "B": 0.82},
        "merges": {
            "x": {"test": {"A": X_A[i], "B": 0.8}},
            "y": {"test": {"A": 0.75, "B": Y_B[i]}},
        },
    }


def test_mean_sd_closed_form() -> None:
    assert report.mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0, 3)
    assert report.mean_sd([2.0, float("nan"), 4.0]) == (3.0, pytest.approx(math.sqrt(2)), 2)
    assert report.mean_sd([5.0]) == (5.0, 0.0, 1)
    mean, sd, n = report.mean_sd([float("nan")])
    assert math.isnan(mean) and math.isnan(sd) and n == 0


def test_aggregate_three_seeds_by_hand() -> None:
    agg = report.aggregate_seeds([_run(i) for i in range(3)], ["s0", "s1", "s2"])
    x = agg["rows"]["merge: x"]
    # avg acc per seed: (0.7+0.8)/2, (0.8+0.8)/2, (0.9+0.8)/2 = 0.75, 0.80, 0.85
    assert x["avg"]["values"] == pytest.approx([0.75, 0.80, 0.85])
    assert x["avg"]["mean"] == pytest.approx(0.80) and x["avg"]["sd"] == pytest.approx(0.05)
    # gain kept on A only: (0.7−0.5)/0.4, (0.8−0.5)/0.4, (0.9−0.5)/0.4 = 0.5, 0.75, 1.0
    assert x["kept"]["values"] == pytest.approx([0.5, 0.75, 1.0])
    assert x["kept"]["mean"] == pytest.approx(0.75) and x["kept"]["sd"] == pytest.approx(0.25)
    assert x["kept"]["n"] == 3
    # normalised, seed 0: (0.7/0.9 + 0.8/0.82)/2
    assert x["norm"]["values"][0] == pytest.approx((0.7 / 0.9 + 0.8 / 0.82) / 2)
    y = agg["rows"]["merge: y"]
    assert y["avg"]["values"] == pytest.approx([0.825, 0.825, 0.675])
    assert y["avg"]["sd"] == pytest.approx(math.sqrt((0.05**2 * 2 + 0.1**2) / 2))
    assert y["kept"]["values"] == pytest.approx([0.625] * 3) and y["kept"]["sd"] == 0.0
    probe, tuned = agg["rows"]["linear probe"], agg["rows"]["individual fine-tunes"]
    assert probe["kept"]["mean"] == 0.0 and tuned["kept"]["mean"] == pytest.approx(1.0)
    assert tuned["norm"]["mean"] == pytest.approx(1.0) and tuned["norm"]["sd"] == 0.0
    assert agg["orders"] == [["y", "x"], ["y", "x"], ["x", "y"]]
    assert agg["stable"] is False
    assert agg["gain_tasks"] == [["A"]] * 3 and agg["runs"] == ["s0", "s1", "s2"]
    text = report.seeds_markdown(agg)
    assert "| merge: x | 80.0 ± 5.0 |" in text and "75.0 ± 25.0 (n=3)" in text
    assert "- s2: x > y" in text and "identical in every run: no" in text


def test_aggregate_stable_order_and_no_gain_task() -> None:
    runs = [_run(0), _run(1)]
    assert report.aggregate_seeds(runs)["stable"] is True
    for r in runs:
        r["individual"]["A"] = 0.52  # gain 0.02 < MIN_GAIN: no task counts
    agg = report.aggregate_seeds(runs)
    kept = agg["rows"]["merge: x"]["kept"]
    assert kept["n"] == 0 and all(math.isnan(v) for v in kept["values"])
    assert "— (n=0)" in report.seeds_markdown(agg)
