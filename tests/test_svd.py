"""The fast top-k SVD (potluck.merging.svd) against numpy's full SVD on matrices with known
spectra: every path within the tolerance the module states (1e-9 Gram/exact, 1e-5 randomized
float32), the randomized sketch refused where the spectrum is flat, and TSV's fast and exact
paths agreeing."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.merging.svd import (
    gram_svd,
    polar_factor,
    randomized_svd,
    thin_svd,
    top_k_svd,
)


@pytest.fixture(autouse=True)
def _one_blas_thread() -> Iterator[None]:
    """One BLAS thread: these are LAPACK-bound, and a multi-threaded OpenBLAS on a loaded machine
    ran this module in 115 s instead of 7 s here (load ≈ 18 on 2 cores); results are the same."""
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _factors(m: int, n: int, r: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random orthonormal U [m, r], V [n, r]."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v, _ = np.linalg.qr(rng.standard_normal((n, r)))
    return u, v


def _known(m: int, n: int, spectrum: np.ndarray, seed: int = 0) -> np.ndarray:
    """U·diag(spectrum)·Vᵀ with random orthonormal U [m, r], V [n, r] (r = len(spectrum))."""
    u, v = _factors(m, n, spectrum.size, seed)
    return np.asarray((u * spectrum) @ v.T)


def _errors(
    got: tuple[np.ndarray, ...], a: np.ndarray, k: int, spectrum: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[float, float]:  # fmt: skip
    """Relative Frobenius error of the rank-k reconstruction, largest relative σ error, against
    numpy's full SVD of ``a`` (or, for the large matrices, the known factors of ``_known``)."""
    if spectrum is None:
        u0, s0, vt0 = np.linalg.svd(a, full_matrices=False)
    else:
        u0, v0 = _factors(*a.shape, spectrum.size, seed)
        s0, vt0 = spectrum, v0.T
    want = (u0[:, :k] * s0[:k]) @ vt0[:k]
    u, s, vt = got
    assert u.shape == (a.shape[0], k) and s.shape == (k,) and vt.shape == (k, a.shape[1])
    recon = float(np.linalg.norm((u * s) @ vt - want) / np.linalg.norm(want))
    return recon, float(np.max(np.abs(s - s0[:k]) / s0[:k]))


POWER_LAW = (1.0 + np.arange(384)) ** -0.5  # fine-tune-like: no gap, slow decay


@pytest.mark.parametrize("shape", [(3052, 384), (384, 1536), (384, 384)])
def test_top_k_matches_the_full_svd_on_embedding_and_layer_shapes(shape: tuple[int, int]) -> None:
    """The 30522 × 384 embedding at a tenth of its height, an MLP matrix and a square one,
    power-law spectrum, k = ⌊384/5⌋ as TSV with five tasks: Gram path, within 1e-9."""
    a = _known(*shape, POWER_LAW[: min(shape)])
    recon, sv = _errors(top_k_svd(a, 76, rng=np.random.default_rng(0)), a, 76)
    assert recon <= 1e-9 and sv <= 1e-9


def test_exact_path_and_rank_deficient_matrices_fall_back_to_the_full_svd() -> None:
    """k above the rank: Gram refuses (σ_k ≈ 0), the exact SVD answers; exact=True likewise."""
    a = _known(300, 120, np.array([3.0, 2.0, 1.0]))
    assert gram_svd(a, 5) is None
    for exact in (False, True):
        u, s, vt = top_k_svd(a, 5, rng=np.random.default_rng(0), exact=exact)
        np.testing.assert_allclose(s[:3], [3.0, 2.0, 1.0], rtol=1e-12)
        assert np.all(s[3:] < 1e-12)
        np.testing.assert_allclose((u * s) @ vt, a, atol=1e-12)


def test_randomized_path_runs_on_a_large_matrix_with_a_gap_within_1e_5() -> None:
    """Shorter side 1024, k = 32: the float32 sketch is kept (σ_{k+11} ≤ 0.1·σ_k) and is the
    result of ``top_k_svd``; within the stated 1e-5 of the full SVD."""
    spectrum = np.concatenate([np.linspace(2.0, 1.0, 32), 0.01 * np.linspace(1.0, 0.1, 168)])
    a = _known(2048, 1024, spectrum, seed=3)
    got = top_k_svd(a, 32, rng=np.random.default_rng(7))
    (_, s, _), tail = randomized_svd(a, 32, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(got[1], s)  # the randomized answer was kept
    assert tail <= 0.1 * s[-1]
    recon, sv = _errors(got, a, 32, spectrum, seed=3)
    assert recon <= 1e-5 and sv <= 1e-5


def test_randomized_sketch_is_refused_where_the_spectrum_is_flat() -> None:
    """1024 × 1024, power-law spectrum: the sketch misses > 10 % of σ_k, so the Gram path answers
    (a bare randomized SVD would be off by percents here)."""
    spectrum = (1.0 + np.arange(300)) ** -0.5
    a = _known(1024, 1024, spectrum, seed=4)
    (_, s_rand, _), tail = randomized_svd(a, 32, rng=np.random.default_rng(7))
    assert tail > 0.1 * s_rand[-1]
    recon, sv = _errors(top_k_svd(a, 32, rng=np.random.default_rng(7)), a, 32, spectrum, seed=4)
    assert recon <= 1e-9 and sv <= 1e-9


def test_thin_svd_is_numpys_svd_for_tall_wide_and_square() -> None:
    rng = np.random.default_rng(5)
    for shape in [(500, 40), (40, 500), (60, 50)]:
        a = rng.standard_normal(shape)
        u, s, vt = thin_svd(a)
        np.testing.assert_allclose(s, np.linalg.svd(a, compute_uv=False), rtol=1e-12)
        np.testing.assert_allclose((u * s) @ vt, a, atol=1e-12)
        np.testing.assert_allclose(u.T @ u, np.eye(min(shape)), atol=1e-12)


def test_polar_factor_matches_the_eigh_closed_form_and_survives_rank_deficiency() -> None:
    """W = X·(XᵀX)^(-1/2) for a full-rank tall X; a rank-deficient X still gives orthonormal
    columns (the exact SVD path) whose product with Xᵀ is symmetric positive semidefinite."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 30))
    evals, evecs = np.linalg.eigh(x.T @ x)
    np.testing.assert_allclose(polar_factor(x), x @ (evecs / np.sqrt(evals)) @ evecs.T, atol=1e-12)
    x[:, 1] = x[:, 0]
    w = polar_factor(x)
    np.testing.assert_allclose(w.T @ w, np.eye(30), atol=1e-12)
    h = w.T @ x
    np.testing.assert_allclose(h, h.T, atol=1e-10)
    assert np.linalg.eigvalsh(h).min() > -1e-10


TSV = MERGE_METHODS.get("tsv")


def test_tsv_fast_path_equals_the_exact_path_within_1e_9() -> None:
    """Five fine-tune-like task matrices (shared low-rank part + power-law noise), an
    embedding-shaped and a square matrix: ``svd: fast`` within 1e-9 of ``svd: exact``."""
    rng = np.random.default_rng(8)
    for shape in [(1200, 96), (96, 96)]:
        base = rng.standard_normal(shape)
        shared = _known(*shape, np.array([0.3, 0.2]), seed=9)
        models = [
            base + shared + _known(*shape, 0.05 * POWER_LAW[: min(shape)], seed=10 + i)
            for i in range(5)
        ]
        fast = TSV.merge(models, base, None, name="w", seed=0)
        exact = TSV.merge(models, base, None, name="w", seed=0, svd="exact")
        rel = np.linalg.norm(fast - exact) / np.linalg.norm(exact - base)
        assert rel <= 1e-9


def test_tsv_svd_parameter_names_its_choices() -> None:
    base = np.zeros((3, 2))
    with pytest.raises(UserError, match="svd") as e:
        TSV.merge([base, base], base, None, name="w", seed=0, svd="lanczos")
    assert "fast" in str(e.value) + str(e.value.hint)


@pytest.mark.heavy
def test_top_k_on_the_full_30522_by_384_embedding_shape() -> None:
    """The real word-embedding shape of all-MiniLM-L6-v2 (~94 MB per float64 copy), power-law
    spectrum, k = 76: within 1e-9 of the known factors, fast and exact paths alike."""
    spectrum = POWER_LAW
    a = _known(30522, 384, spectrum, seed=13)
    for exact in (False, True):
        got = top_k_svd(a, 76, rng=np.random.default_rng(0), exact=exact)
        recon, sv = _errors(got, a, 76, spectrum, seed=13)
        assert recon <= 1e-9 and sv <= 1e-9
