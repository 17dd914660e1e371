"""Fisher merging and RegMean against naive float64 references, closed forms and hand-checked cases;
the ``stats=`` plumbing of ``MergeMethod.merge``."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS, TensorStats

NAME = "layer.weight"


def merge(method: str, models, stats=None, weights=None, **params) -> np.ndarray:
    m = MERGE_METHODS.get(method)
    return m.merge(models, None, weights, name=NAME, seed=0, stats=stats, **params)


def fisher_stats(arrays, norms=None) -> list[TensorStats]:
    norms = norms or [None] * len(arrays)
    return [
        TensorStats(np.asarray(a), "fisher", None, n) for a, n in zip(arrays, norms, strict=True)
    ]


def gram_stats(grams, axis: int = 1) -> list[TensorStats]:
    return [TensorStats(np.asarray(g), "gram", axis) for g in grams]


# ── naive references ────────────────────────────────────────────────────────────────────────


def ref_fisher(models, fishers, weights, eps, norms=None, favor_target=False) -> np.ndarray:
    """Entry by entry, Python floats: Σ c·max(F, ε)·θ / Σ c·max(F, ε)."""
    flat_m = [[float(x) for x in np.ravel(m)] for m in models]
    flat_f = [[float(x) for x in np.ravel(f)] for f in fishers]
    coeffs = [w / (norms[i] if norms else 1.0) for i, w in enumerate(weights)]
    out = []
    for j in range(len(flat_m[0])):
        num = den = 0.0
        for i in range(len(models)):
            f = flat_f[i][j] if favor_target and i > 0 else max(flat_f[i][j], eps)
            num += coeffs[i] * f * flat_m[i][j]
            den += coeffs[i] * f
        out.append(num / den)
    return np.array(out).reshape(np.shape(models[0]))


def gauss_jordan_solve(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    """Solve A·X = B by Gauss–Jordan elimination with partial pivoting (Python floats)."""
    n, m = len(a), len(b[0])
    rows = [list(a[i]) + list(b[i]) for i in range(n)]
    for c in range(n):
        piv = max(range(c, n), key=lambda r: abs(rows[r][c]))
        rows[c], rows[piv] = rows[piv], rows[c]
        p = rows[c][c]
        rows[c] = [x / p for x in rows[c]]
        for r in range(n):
            if r != c:
                f = rows[r][c]
                rows[r] = [x - f * y for x, y in zip(rows[r], rows[c], strict=True)]
    return [row[n : n + m] for row in rows]


def ref_regmean(weights_list, grams, alpha, coeffs=None) -> np.ndarray:
    """nn.Linear weights [out, in]: Wᵀ = (Σ c·G̃)⁻¹ Σ c·G̃·Wᵀ, loops over entries."""
    d = len(grams[0])
    out_dim = len(weights_list[0])
    coeffs = coeffs or [1.0] * len(grams)
    lhs = [[0.0] * d for _ in range(d)]
    rhs = [[0.0] * out_dim for _ in range(d)]
    for c, g, w in zip(coeffs, grams, weights_list, strict=True):
        gt = [[float(g[i][j]) * (1.0 if i == j else alpha) for j in range(d)] for i in range(d)]
        for i in range(d):
            for j in range(d):
                lhs[i][j] += c * gt[i][j]
            for o in range(out_dim):
                rhs[i][o] += c * sum(gt[i][k] * float(w[o][k]) for k in range(d))
    wt = gauss_jordan_solve(lhs, rhs)
    return np.array(wt).T


@pytest.fixture
def linear_pair(rng: np.random.Generator):
    """Two nn.Linear weights [3, 4] and the Grams of 20 random inputs each."""
    ws = [rng.normal(size=(3, 4)) for _ in range(2)]
    xs = [rng.normal(size=(20, 4)) * np.array([1.0, 2.0, 0.5, 1.5]) for _ in range(2)]
    return ws, xs, [x.T @ x for x in xs]


# ── Fisher ──────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("normalize", "favor_target", "weights"),
    [(False, False, None), (True, False, [0.3, 0.7, 1.0]), (True, True, [1.0, 2.0, 0.5])],
)
def test_fisher_matches_reference(rng, normalize, favor_target, weights) -> None:
    models = [rng.normal(size=(3, 4)) for _ in range(3)]
    fishers = [rng.random(size=(3, 4)) ** 3 for _ in range(3)]
    fishers[1][0, 0] = 0.0  # floored (or not, for a donor with favor_target)
    norms = [float(np.linalg.norm(f)) * 3.0 for f in fishers]  # "whole model" larger than one
    got = merge(
        "fisher",
        models,
        fisher_stats(fishers, norms),
        weights,
        normalize=normalize,
        favor_target=favor_target,
        epsilon=1e-3,
    )
    w = weights or [1.0, 1.0, 1.0]
    want = ref_fisher(models, fishers, w, 1e-3, norms if normalize else None, favor_target)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


def test_fisher_with_equal_fishers_is_the_weighted_average(rng) -> None:
    models = [rng.normal(size=(5,)) for _ in range(3)]
    f = rng.random(size=5) + 0.1
    got = merge("fisher", models, fisher_stats([f, f, f], [2.0] * 3), [1.0, 2.0, 3.0])
    want = (models[0] + 2 * models[1] + 3 * models[2]) / 6
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_fisher_floor_by_hand() -> None:
    a, b = np.array([1.0, 1.0, 1.0]), np.array([3.0, 3.0, 3.0])
    fa, fb = np.array([0.0, 0.0, 1.0]), np.array([0.0, 1.0, 3.0])
    got = merge("fisher", [a, b], fisher_stats([fa, fb]), normalize=False, epsilon=1e-6)
    # entry 0: both floored → mean 2; entry 1: b dominates (1e-6 vs 1); entry 2: (1 + 9) / 4
    np.testing.assert_allclose(got, [2.0, (1e-6 + 3.0) / (1 + 1e-6), 2.5], rtol=1e-12)
    target = merge("fisher", [a, b], fisher_stats([fa, fb]), normalize=False, favor_target=True)
    np.testing.assert_allclose(target[0], 1.0)  # only the target is floored: it wins
    with pytest.raises(UserError, match=r"weighted Fisher sum of tensor 'layer.weight' is ≤ 0"):
        merge("fisher", [a, b], fisher_stats([fa, fb]), normalize=False, epsilon=0.0)


def test_fisher_normalisation_uses_the_whole_model_norm(rng) -> None:
    a, b = rng.normal(size=4), rng.normal(size=4)
    f = np.ones(4)
    # the same tensor Fisher, but model b's whole-model Fisher is 3x larger: b counts 1/3
    got = merge("fisher", [a, b], fisher_stats([f, f], [1.0, 3.0]))
    np.testing.assert_allclose(got, (a + b / 3) / (1 + 1 / 3), rtol=1e-12)
    with pytest.raises(UserError, match="model 0 has no whole-model Fisher norm") as err:
        merge("fisher", [a, b], [f, f])  # bare arrays carry no norm
    assert "normalize=false" in str(err.value.hint)
    np.testing.assert_allclose(merge("fisher", [a, b], [f, f], normalize=False), (a + b) / 2)


def test_fisher_single_model_is_identity(rng) -> None:
    x = rng.normal(size=(2, 3))
    got = merge("fisher", [x], fisher_stats([rng.random((2, 3))], [1.0]))
    np.testing.assert_allclose(got, x, rtol=1e-15)


def test_fisher_missing_statistics_policy(rng) -> None:
    a, b = rng.normal(size=3), rng.normal(size=3)
    f = fisher_stats([np.ones(3)], [1.0])[0]
    np.testing.assert_allclose(merge("fisher", [a, b]), (a + b) / 2)  # no stats: isometric
    with pytest.raises(UserError, match=r"model\(s\) \[1\] have no statistics for tensor") as err:
        merge("fisher", [a, b], [f, None])
    assert err.value.data["models"] == [1]
    with pytest.raises(UserError, match=r"model\(s\) \[0, 1\]"):
        merge("fisher", [a, b], [None, None])
    got = merge("fisher", [a, b], [f, None], weights=[1.0, 3.0], missing="average")
    np.testing.assert_allclose(got, (a + 3 * b) / 4, rtol=1e-12)


# ── RegMean ─────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_regmean_matches_reference(linear_pair, alpha: float) -> None:
    ws, _, grams = linear_pair
    got = merge("regmean", ws, gram_stats(grams), alpha=alpha)
    want = ref_regmean([w.tolist() for w in ws], [g.tolist() for g in grams], alpha)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_regmean_weights_scale_the_grams(linear_pair) -> None:
    ws, _, grams = linear_pair
    got = merge("regmean", ws, gram_stats(grams), [0.25, 2.0], alpha=0.5)
    want = ref_regmean([w.tolist() for w in ws], [g.tolist() for g in grams], 0.5, [0.25, 2.0])
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


def test_regmean_minimises_the_joint_regression_loss(linear_pair) -> None:
    """α = 1: the merged W is the least-squares fit of all models' outputs on all their inputs."""
    ws, xs, grams = linear_pair
    got = merge("regmean", ws, gram_stats(grams), alpha=1.0)
    x_all = np.vstack(xs)
    y_all = np.vstack([x @ w.T for x, w in zip(xs, ws, strict=True)])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)

    def loss(w: np.ndarray) -> float:
        return sum(float(np.sum((x @ w.T - x @ wi.T) ** 2)) for x, wi in zip(xs, ws, strict=True))

    assert loss(got) < loss((ws[0] + ws[1]) / 2)


def test_regmean_alpha_zero_is_a_per_feature_weighted_average(linear_pair) -> None:
    ws, _, grams = linear_pair
    got = merge("regmean", ws, gram_stats(grams), alpha=0.0)
    d0, d1 = np.diag(grams[0]), np.diag(grams[1])
    np.testing.assert_allclose(got, (ws[0] * d0 + ws[1] * d1) / (d0 + d1), rtol=1e-12)
    same = [np.diag(d0), np.diag(d0)]  # equal diagonals: the plain average
    np.testing.assert_allclose(
        merge("regmean", ws, gram_stats(same), alpha=0.0), (ws[0] + ws[1]) / 2, rtol=1e-12
    )


def test_regmean_conv1d_orientation(linear_pair) -> None:
    """GPT-2 Conv1D stores [in, out]: input_axis 0 gives the transpose of the nn.Linear result."""
    ws, _, grams = linear_pair
    linear = merge("regmean", ws, gram_stats(grams, axis=1))
    conv = merge("regmean", [w.T for w in ws], gram_stats(grams, axis=0))
    np.testing.assert_allclose(conv, linear.T, rtol=1e-12)


def test_regmean_single_model_is_identity(linear_pair) -> None:
    ws, _, grams = linear_pair
    np.testing.assert_allclose(merge("regmean", ws[:1], gram_stats(grams[:1])), ws[0], rtol=1e-10)


def test_regmean_singular_gram_keeps_the_average_where_there_is_no_data(linear_pair) -> None:
    ws, xs, _ = linear_pair
    xs = [x.copy() for x in xs]
    for x in xs:
        x[:, 2] = 0.0  # feature 2 never seen by any model
    grams = [x.T @ x for x in xs]
    got = merge("regmean", ws, gram_stats(grams), alpha=1.0)
    np.testing.assert_allclose(got[:, 2], (ws[0][:, 2] + ws[1][:, 2]) / 2, rtol=1e-10)
    keep = [0, 1, 3]
    reduced = merge(
        "regmean",
        [w[:, keep] for w in ws],
        gram_stats([g[np.ix_(keep, keep)] for g in grams]),
        alpha=1.0,
    )
    np.testing.assert_allclose(got[:, keep], reduced, rtol=1e-9, atol=1e-12)


def test_regmean_without_grams_averages(rng) -> None:
    bias = [rng.normal(size=3) for _ in range(2)]
    np.testing.assert_allclose(merge("regmean", bias, [None, None]), (bias[0] + bias[1]) / 2)
    np.testing.assert_allclose(
        merge("regmean", bias, None, [1.0, 3.0]), (bias[0] + 3 * bias[1]) / 4
    )
    w = [rng.normal(size=(2, 2)) for _ in range(2)]
    with pytest.raises(UserError, match=r"model\(s\) \[0\] have no statistics"):
        merge("regmean", w, [None, np.eye(2)])
    np.testing.assert_allclose(
        merge("regmean", w, [None, np.eye(2)], missing="average"), (w[0] + w[1]) / 2
    )


# ── statistics validation ───────────────────────────────────────────────────────────────────


def test_stats_refused_by_methods_without_needs_stats() -> None:
    with pytest.raises(UserError, match=r"'linear' takes no statistics \(tensor 'layer\.weight'\)"):
        merge("linear", [np.ones(2), np.ones(2)], [np.ones(2), np.ones(2)])
    assert MERGE_METHODS.get("fisher").needs_stats == "fisher"
    assert MERGE_METHODS.get("regmean").needs_stats == "gram"
    assert MERGE_METHODS.get("ties").needs_stats is None


@pytest.mark.parametrize(
    ("method", "stats", "match"),
    [
        ("fisher", [np.ones(3)], r"1 statistics entries for 2 model\(s\)"),
        ("fisher", [np.ones(3), np.ones(4)], r"model 1 .* have shape \[4\], the tensor \[3\]"),
        ("fisher", [np.ones(3), -np.ones(3)], "model 1 .* have negative Fisher values"),
        ("fisher", [np.ones(3), np.array([1, np.nan, 1])], "contain NaN or infinity"),
        ("fisher", [np.ones(3), np.full(3, np.inf)], "contain NaN or infinity"),
        ("regmean", [np.eye(3), np.eye(3)], r"are a Gram matrix, but the tensor has shape \[3\]"),
    ],
)
def test_bad_statistics_name_the_tensor(method, stats, match) -> None:
    with pytest.raises(UserError, match=match) as err:
        merge(method, [np.ones(3), np.ones(3)], stats, normalize=False) if method == "fisher" else (
            merge(method, [np.ones(3), np.ones(3)], stats)
        )
    assert err.value.data["tensor"] == NAME


@pytest.mark.parametrize(
    ("gram", "axis", "match"),
    [
        (np.eye(3), 1, r"have shape \[3, 3\], but input axis 1 of \[2, 4\] needs \[4, 4\]"),
        (np.eye(4)[:, :3], 1, r"have shape \[4, 3\]"),
        (np.eye(4) + np.triu(np.ones((4, 4)), 1) * 0.5, 1, "are not symmetric"),
        (np.diag([1.0, -1.0, 1.0, 1.0]), 1, "are not positive semi-definite"),
        (np.array([[1.0, 2, 0, 0], [2, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), 1, "semi-definite"),
        (np.eye(4), 2, "have input axis 2"),
    ],
)
def test_bad_gram_matrices(gram, axis, match) -> None:
    w = [np.ones((2, 4)), np.ones((2, 4))]
    with pytest.raises(UserError, match=match):
        merge("regmean", w, gram_stats([np.eye(4), gram], axis=axis))


def test_statistics_of_the_wrong_kind() -> None:
    w = [np.ones((2, 2)), np.ones((2, 2))]
    with pytest.raises(UserError, match=r"are 'fisher' statistics, but it needs 'gram'") as err:
        merge("regmean", w, fisher_stats([np.ones((2, 2))] * 2))
    assert "potluck stats gram" in str(err.value.hint)
    with pytest.raises(UserError, match=r"are 'gram' statistics, but it needs 'fisher'"):
        merge("fisher", w, gram_stats([np.eye(2)] * 2))


def test_nearly_symmetric_gram_is_accepted_and_symmetrised(linear_pair) -> None:
    ws, _, grams = linear_pair
    noisy = [g.astype(np.float32).astype(np.float64) for g in grams]
    noisy[0][0, 1] *= 1 + 1e-7  # float32 accumulation noise
    got = merge("regmean", ws, gram_stats(noisy), alpha=1.0)
    np.testing.assert_allclose(got, merge("regmean", ws, gram_stats(grams), alpha=1.0), rtol=1e-5)


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_gram_checks_work_block_by_block(linear_pair, monkeypatch, block: int) -> None:
    import potluck.merging.validate as validate

    monkeypatch.setattr(validate, "_BLOCK", block)
    ws, _, grams = linear_pair
    noisy = grams[0].copy()
    noisy[3, 1] *= 1 + 1e-6
    exact = (noisy + noisy.T) / 2
    got = merge("regmean", ws, gram_stats([noisy, grams[1]]), alpha=0.7)
    want = ref_regmean([w.tolist() for w in ws], [exact.tolist(), grams[1].tolist()], 0.7)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    bad = grams[0].copy()
    bad[3, 0] += 1.0
    with pytest.raises(UserError, match="are not symmetric"):
        merge("regmean", ws, gram_stats([bad, grams[1]]))
    assert noisy[3, 1] != noisy[1, 3]  # the caller's array is left alone
