"""TSV-Merge against independent references: the polar decomposition through an eigensolver,
the closed form for tasks with orthogonal subspaces, and the mean task vector off matrices."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS

TSV = MERGE_METHODS.get("tsv")


def _polar(x: np.ndarray) -> np.ndarray:
    """Orthonormal factor of the polar decomposition x = W·(xᵀx)^½, via eigh (x tall, full rank)."""
    evals, evecs = np.linalg.eigh(x.T @ x)
    return x @ (evecs / np.sqrt(evals)) @ evecs.T


def _naive_tsv(base: np.ndarray, models: list[np.ndarray], alpha: float, k: int) -> np.ndarray:
    us, ss, vs = [], [], []
    for m in models:
        u, s, vt = np.linalg.svd(m - base)
        order = np.argsort(-s)[:k]  # explicit top-k by value
        us.append(u[:, order])
        ss.append(s[order])
        vs.append(vt[order].T)
    u, v = _polar(np.hstack(us)), _polar(np.hstack(vs))
    return base + alpha * u @ np.diag(np.concatenate(ss)) @ v.T


@pytest.mark.parametrize(("alpha", "fraction", "k"), [(1.0, 0.0, 4), (0.7, 0.25, 3)])
def test_tsv_matches_a_naive_polar_reference(alpha: float, fraction: float, k: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 13))
    models = [base + 0.1 * rng.normal(size=base.shape) for _ in range(3)]  # k = ⌊13/3⌋ = 4
    got = TSV.merge(models, base, None, name="w", seed=0, alpha=alpha, sv_fraction=fraction)
    np.testing.assert_allclose(got, _naive_tsv(base, models, alpha, k), rtol=1e-9, atol=1e-12)


def test_tasks_in_orthogonal_subspaces_are_summed_exactly() -> None:
    """Disjoint singular subspaces: decorrelation changes nothing, TSV = Σ τᵢ (rank ≤ k)."""
    rng = np.random.default_rng(1)
    q_out, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    q_in, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    base = rng.normal(size=(12, 9))
    taus = [
        q_out[:, 0:2] @ np.diag([3.0, 1.0]) @ q_in[:, 0:2].T,
        q_out[:, 2:4] @ np.diag([2.0, 0.5]) @ q_in[:, 2:4].T,
        q_out[:, 4:6] @ np.diag([1.5, 0.2]) @ q_in[:, 4:6].T,
    ]
    models = [base + t for t in taus]
    got = TSV.merge(models, base, None, name="w", seed=0)  # k = ⌊9/3⌋ = 3 ≥ rank 2
    np.testing.assert_allclose(got, base + sum(taus), rtol=1e-10, atol=1e-12)


def test_zero_task_vectors_give_the_base_and_null_directions_are_dropped() -> None:
    """A rank-1 update with k = 3: the two σ = 0 triplets must not rotate the other task."""
    base = np.zeros((5, 4))
    t0 = np.outer([1.0, 0, 0, 0, 0], [0, 1.0, 0, 0])
    t1 = np.outer([0, 1.0, 1.0, 0, 0], [1.0, 0, 0, 1.0])
    got = TSV.merge([base + t0, base + t1, base], base, None, name="w", seed=0, sv_fraction=0.75)
    np.testing.assert_allclose(got, t0 + t1, atol=1e-12)
    zero = TSV.merge([base, base], base, None, name="w", seed=0)
    np.testing.assert_array_equal(zero, base)


def test_one_task_at_full_rank_is_the_fine_tune() -> None:
    rng = np.random.default_rng(2)
    base, model = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    got = TSV.merge([model], base, None, name="w", seed=0, sv_fraction=1.0)
    np.testing.assert_allclose(got, model, rtol=1e-10, atol=1e-12)


def test_vectors_and_weights_take_the_weighted_mean_task_vector() -> None:
    base = np.array([1.0, 2.0, 3.0])
    t0, t1 = np.array([1.0, 0.0, 2.0]), np.array([3.0, -2.0, 0.0])
    got = TSV.merge([base + t0, base + t1], base, [1.0, 0.5], name="b", seed=0, alpha=2.0)
    want = base + 2.0 * ((t0 + 0.5 * t1) / 2)
    np.testing.assert_allclose(got, want, rtol=1e-15)


def test_tsv_schema_and_errors() -> None:
    assert TSV.reference_url == "https://arxiv.org/abs/2412.00081" and TSV.needs_base
    with pytest.raises(UserError, match=r"'sv_fraction' = 1\.5 is not allowed"):
        TSV.merge([np.ones((2, 2))], np.zeros((2, 2)), None, name="w", seed=0, sv_fraction=1.5)
    with pytest.raises(UserError, match="needs a base model"):
        TSV.merge([np.ones((2, 2))], None, None, name="w", seed=0)
