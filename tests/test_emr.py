"""emr (EMR-Merging, Huang et al. 2024): a worked case of elect / mask / rescale and a naive
float64 reference, element by element."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.merging.emr import elect_unified, emr_mask, emr_rescaler, masked_sums

TAUS = np.array([[1.0, -2.0, 3.0, 0.0], [2.0, 1.0, -1.0, 0.5], [-1.0, -3.0, 2.0, 0.0]])


def test_worked_case() -> None:
    # Σ τ = [2, -4, 4, 0.5] → signs [+, -, +, +]; largest agreeing magnitudes [2, 3, 3, 0.5]
    uni = elect_unified(TAUS)
    assert uni.tolist() == [2.0, -3.0, 3.0, 0.5]
    masks = [emr_mask(t, uni).tolist() for t in TAUS]
    assert masks == [
        [True, True, True, False],
        [True, False, False, True],
        [False, True, True, False],
    ]
    scales = [emr_rescaler(*masked_sums(t, uni, emr_mask(t, uni))) for t in TAUS]
    assert scales == [6 / 8, 4.5 / 2.5, 6 / 6]
    base = np.array([1.0, 1.0, 1.0, 1.0])
    out = MERGE_METHODS.get("emr").merge(list(base + TAUS), base, None, name="t", seed=0)
    assert out.tolist() == (base + uni).tolist()


def _naive_elect(taus: np.ndarray) -> np.ndarray:
    out = []
    for j in range(taus.shape[1]):
        col = list(taus[:, j])
        sign = 1.0 if sum(col) > 0 else -1.0
        out.append(sign * max([abs(v) for v in col if v * sign > 0], default=0.0))
    return np.array(out)


def test_matches_naive_float64(rng: np.random.Generator) -> None:
    taus = rng.normal(size=(5, 300)) * (rng.random((5, 300)) < 0.6)
    uni = _naive_elect(taus)
    np.testing.assert_array_equal(elect_unified(taus), uni)
    for t in taus:
        mask = [a * b > 0 for a, b in zip(t, uni, strict=True)]
        num = sum(abs(a) for a in t)
        den = sum(abs(b) for b, m in zip(uni, mask, strict=True) if m)
        assert emr_mask(t, uni).tolist() == mask
        assert emr_rescaler(*masked_sums(t, uni, np.array(mask))) == pytest.approx(
            num / den, rel=1e-12
        )
    # a mask that keeps nothing leaves nothing to rescale
    assert emr_rescaler(0.0, 0.0) == 1.0


def test_refusals() -> None:
    method = MERGE_METHODS.get("emr")
    with pytest.raises(UserError, match="has no parameter 'lambda_'"):
        method.merge([TAUS[0]], np.zeros(4), None, name="t", seed=0, lambda_=2.0)
    with pytest.raises(UserError, match="weights"):
        method.merge([TAUS[0], TAUS[1]], np.zeros(4), [1.0, 2.0], name="t", seed=0)
