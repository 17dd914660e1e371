"""consensus and tall_masks (TALL masks, Wang et al. 2024): worked cases and a naive float64
reference, element by element."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.merging.masks import consensus_mask, tall_mask

BASE = np.array([0.5, -0.5, 1.0])
TAUS = np.array([[1.0, 0.1, -1.0], [1.0, -1.0, 0.0]])


def _merge(method: str, models: np.ndarray, base: np.ndarray, **params: Any) -> np.ndarray:
    return MERGE_METHODS.get(method).merge(list(models), base, None, name="t", seed=0, **params)


def test_worked_case_tall_masks_and_consensus() -> None:
    # τ_MTL = τ1 + τ2 = [2, -0.9, -1]; mₜ = |τₜ| > 0.5·|τ_MTL − τₜ|
    tau_mtl = TAUS.sum(axis=0)
    assert tall_mask(TAUS[0], tau_mtl, 0.5).tolist() == [True, False, True]
    assert tall_mask(TAUS[1], tau_mtl, 0.5).tolist() == [True, True, False]
    masks = np.stack([tall_mask(t, tau_mtl, 0.5) for t in TAUS])
    assert consensus_mask(masks, 2).tolist() == [True, False, False]
    models = BASE + TAUS
    out = _merge("consensus", models, BASE, mask_lambda=0.5, k=2)
    assert out.tolist() == [2.5, -0.5, 1.0]  # θ₀ + [2, 0, 0]
    assert (
        _merge("consensus", models, BASE, mask_lambda=0.5, k=1).tolist()
        == (BASE + tau_mtl).tolist()
    )
    assert (
        _merge("tall_masks", models, BASE, lambda_=0.5).tolist() == (BASE + 0.5 * tau_mtl).tolist()
    )


def _naive_ties_delta(taus: np.ndarray, density: float) -> np.ndarray:
    kept = []
    for tau in taus:
        k = int(np.ceil(density * tau.size)) if density < 1 else tau.size
        order = sorted(range(tau.size), key=lambda j: -abs(tau[j]))
        keep = set(order[:k])
        kept.append([tau[j] if j in keep else 0.0 for j in range(tau.size)])
    out = []
    for j in range(taus.shape[1]):
        col = [row[j] for row in kept]
        sign = 1.0 if sum(col) >= 0 else -1.0
        agree = [v for v in col if v * sign > 0]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return np.array(out)


def _naive_consensus(
    base: np.ndarray, taus: np.ndarray, lam: float, mask_lambda: float, k: int, delta: np.ndarray
) -> np.ndarray:
    out = []
    for j in range(base.size):
        mtl = lam * delta[j]
        count = sum(1 for t in taus if abs(t[j]) > mask_lambda * abs(mtl - t[j]))
        out.append(base[j] + (mtl if count >= k else 0.0))
    return np.array(out)


@pytest.mark.parametrize("base_method", ["task_arithmetic", "ties"])
def test_consensus_matches_naive_float64(base_method: str, rng: np.random.Generator) -> None:
    base = rng.normal(size=200)
    taus = rng.normal(scale=0.1, size=(4, 200)) * (rng.random((4, 200)) < 0.5)
    density = 0.3 if base_method == "ties" else 1.0
    delta = taus.sum(axis=0) if base_method == "task_arithmetic" else _naive_ties_delta(taus, 0.3)
    want = _naive_consensus(base, taus, 0.7, 0.3, 2, delta)
    got = _merge(
        "consensus", base + taus, base, base_method=base_method, lambda_=0.7, mask_lambda=0.3,
        k=2, density=density,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_tall_masks_per_model_lambda_and_refusals(rng: np.random.Generator) -> None:
    base = rng.normal(size=(8, 4))
    models = base + rng.normal(size=(3, 8, 4))
    out = _merge("tall_masks", models, base, mask_lambda=[0.2, 0.4, 0.6])
    np.testing.assert_array_equal(out, base + (models - base).sum(axis=0))
    with pytest.raises(UserError, match="3 values of 'mask_lambda' for 2 models"):
        _merge("consensus", models[:2], base, mask_lambda=[0.2, 0.4, 0.6])
    with pytest.raises(UserError, match="base_method is task_arithmetic"):
        _merge("consensus", models, base, density=0.5)
    with pytest.raises(UserError, match="needs a base model"):
        MERGE_METHODS.get("tall_masks").merge(list(models), None, None, name="t", seed=0)
    with pytest.raises(UserError, match="parameter 'k' = -1 is not allowed"):
        _merge("consensus", models, base, k=-1)
