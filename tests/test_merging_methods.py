"""Every merge method against a naive float64 reference (Python loops), plus hand-checked cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS, keyed_generator
from potluck.merging.steps import magprune_keep_probs

SHAPE = (3, 4)
NAME = "layer.weight"


def merge(method: str, models, base=None, weights=None, seed: int = 7, **params) -> np.ndarray:
    return MERGE_METHODS.get(method).merge(models, base, weights, name=NAME, seed=seed, **params)


@pytest.fixture
def trio(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Three models and a base of shape 3×4 (continuous values: magnitudes are distinct)."""
    base = rng.normal(size=SHAPE)
    return [base + rng.normal(size=SHAPE) for _ in range(3)], base


# ── naive references: lists of floats, Python loops, float64 ────────────────────────────────


def flat(a: np.ndarray) -> list[float]:
    return [float(x) for x in np.asarray(a, dtype=np.float64).ravel()]


def ref_keep_top(tau: list[float], density: float) -> list[float]:
    """Keep the int(density·n) largest magnitudes (full sort, the obvious way)."""
    if density >= 1:
        return list(tau)
    k = int(density * len(tau) + 1e-9)
    ranked = sorted(range(len(tau)), key=lambda j: -abs(tau[j]))
    keep = set(ranked[:k])
    return [tau[j] if j in keep else 0.0 for j in range(len(tau))]


def ref_keep_middle(tau: list[float], density: float, gamma: float) -> list[float]:
    """Breadcrumbs: ascending ranks [n_bot, n − n_top) survive."""
    n = len(tau)
    if density >= 1:
        return list(tau)
    target = int(density * n + 1e-9)
    n_top = min(int(gamma * n + 1e-9), n - target)
    n_bot = n - target - n_top
    ranked = sorted(range(n), key=lambda j: abs(tau[j]))
    keep = set(ranked[n_bot : n - n_top])
    return [tau[j] if j in keep else 0.0 for j in range(n)]


def ref_combine(taus, weights, consensus, normalize, method="sum") -> list[float]:
    """Σ wτ (÷ Σ w), or TIES' sign election + disjoint (mean), entry by entry."""
    out = []
    for j in range(len(taus[0])):
        vals = [w * t[j] for w, t in zip(weights, taus, strict=True)]
        if not consensus:
            s = sum(vals)
            out.append(s / sum(weights) if normalize else s)
            continue
        score = sum(vals) if method == "sum" else sum((v > 0) - (v < 0) for v in vals)
        sign = 1.0 if score >= 0 else -1.0
        agree = [i for i, v in enumerate(vals) if v != 0 and math.copysign(1.0, v) == sign]
        s = sum(vals[i] for i in agree)
        d = sum(weights[i] for i in agree)
        out.append(s / d if normalize and d != 0 else s)
    return out


def finish(base: np.ndarray, delta: list[float], lam: float = 1.0) -> np.ndarray:
    return np.array([b + lam * d for b, d in zip(flat(base), delta, strict=True)]).reshape(
        base.shape
    )


def taus_of(models, base) -> list[list[float]]:
    return [[m - b for m, b in zip(flat(x), flat(base), strict=True)] for x in models]


# ── linear and task arithmetic ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_reference(trio, normalize: bool) -> None:
    models, _ = trio
    w = [0.5, 0.3, 0.7]
    got = merge("linear", models, weights=w, normalize=normalize)
    cols = [flat(m) for m in models]
    want = [sum(wi * c[j] for wi, c in zip(w, cols, strict=True)) for j in range(12)]
    if normalize:
        want = [x / sum(w) for x in want]
    np.testing.assert_allclose(got, np.array(want).reshape(SHAPE), rtol=1e-12)


def test_linear_without_weights_is_the_mean(trio) -> None:
    models, _ = trio
    np.testing.assert_allclose(merge("linear", models), np.mean(models, axis=0), rtol=1e-12)


def test_linear_weights_summing_to_zero() -> None:
    a, b = np.ones(SHAPE), np.full(SHAPE, 3.0)
    with pytest.raises(UserError, match=r"weights \[1.0, -1.0\] sum to zero"):
        merge("linear", [a, b], weights=[1.0, -1.0])
    np.testing.assert_allclose(merge("linear", [a, b], weights=[1, -1], normalize=False), a - b)


@pytest.mark.parametrize("normalize", [True, False])
def test_task_arithmetic_matches_reference(trio, normalize: bool) -> None:
    models, base = trio
    w = [1.0, 0.5, -0.25]
    got = merge("task_arithmetic", models, base, w, lambda_=0.8, normalize=normalize)
    want = finish(base, ref_combine(taus_of(models, base), w, False, normalize), 0.8)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_task_arithmetic_zero_weight_sum_with_normalize() -> None:
    base = np.zeros(SHAPE)
    with pytest.raises(UserError, match="sum to zero"):
        merge("task_arithmetic", [base + 1, base + 2], base, [2.0, -2.0], normalize=True)


# ── TIES ────────────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("density", "normalize", "consensus"),
    [(0.5, True, "sum"), (0.25, False, "sum"), (0.75, True, "count"), (1.0, True, "sum")],
)
def test_ties_matches_reference(trio, density, normalize, consensus) -> None:
    models, base = trio
    w = [1.0, 0.6, 0.3]
    params = {"density": density, "normalize": normalize, "consensus": consensus}
    got = merge("ties", models, base, w, lambda_=1.5, **params)
    trimmed = [ref_keep_top(t, density) for t in taus_of(models, base)]
    want = finish(base, ref_combine(trimmed, w, True, normalize, consensus), 1.5)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_ties_sign_conflict_by_hand() -> None:
    base = np.array([10.0, 10.0])
    models = [base + np.array([2.0, -1.0]), base + np.array([-3.0, 1.0])]
    # sum: [-1, 0] elects [-, +] (a tie elects +): only τ2 agrees on both entries
    np.testing.assert_array_equal(merge("ties", models, base), [7.0, 11.0])
    # count: one + and one − everywhere, ties elect +: τ1 on entry 0, τ2 on entry 1
    np.testing.assert_array_equal(merge("ties", models, base, consensus="count"), [12.0, 11.0])


def test_ties_disjoint_mean_by_hand() -> None:
    base = np.zeros(1)
    models = [np.array([2.0]), np.array([1.0]), np.array([-2.5])]
    # Σ = 0.5 > 0: the mean of the agreeing +2 and +1
    np.testing.assert_allclose(merge("ties", models, base), [1.5])
    np.testing.assert_allclose(merge("ties", models, base, normalize=False), [3.0])
    # weighted: (3·2 + 1·1) / (3 + 1)
    np.testing.assert_allclose(merge("ties", models, base, [3.0, 1.0, 1.0]), [7 / 4])


def test_ties_trim_keeps_the_largest_by_hand() -> None:
    base = np.zeros(4)
    got = merge("ties", [np.array([0.1, -4.0, 3.0, -0.2])], base, density=0.5)
    np.testing.assert_array_equal(got, [0.0, -4.0, 3.0, 0.0])


def test_ties_density_one_with_agreeing_signs_is_normalized_task_arithmetic(rng) -> None:
    base = rng.normal(size=SHAPE)
    models = [base + np.abs(rng.normal(size=SHAPE)) for _ in range(3)]
    w = [0.2, 0.5, 0.3]
    ta = merge("task_arithmetic", models, base, w, normalize=True)
    np.testing.assert_allclose(merge("ties", models, base, w, density=1.0), ta, rtol=1e-12)


@pytest.mark.parametrize(
    "method", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "della", "task_arithmetic"]
)
def test_all_zero_task_vectors_give_the_base(method: str, rng) -> None:
    base = rng.normal(size=SHAPE)
    params = {} if method == "task_arithmetic" else {"density": 0.5}
    got = merge(method, [base.copy(), base.copy()], base, **params)
    np.testing.assert_array_equal(got, base)


def test_single_model(rng) -> None:
    base, x = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    np.testing.assert_allclose(merge("ties", [x], base), x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(merge("task_arithmetic", [x], base, [0.5]), (x + base) / 2)
    np.testing.assert_allclose(merge("linear", [x], weights=[3.0]), x, rtol=1e-12)
    np.testing.assert_array_equal(merge("passthrough", [x]), x)


# ── DARE ────────────────────────────────────────────────────────────────────────────────────


def ref_dare(taus, density, seed, rescale) -> list[list[float]]:
    out = []
    for i, tau in enumerate(taus):
        draws = flat(keyed_generator(seed, i, NAME).random(SHAPE))
        scale = 1 / density if rescale == "inverse" else 1.0
        out.append([t * scale if u < density else 0.0 for t, u in zip(tau, draws, strict=True)])
    return out


@pytest.mark.parametrize(("method", "ties"), [("dare_linear", False), ("dare_ties", True)])
@pytest.mark.parametrize("rescale", ["inverse", "none"])
def test_dare_matches_reference(trio, method: str, ties: bool, rescale: str) -> None:
    models, base = trio
    w = [1.0, 0.5, 0.8]
    got = merge(method, models, base, w, seed=11, density=0.4, rescale=rescale)
    dropped = ref_dare(taus_of(models, base), 0.4, 11, rescale)
    want = finish(base, ref_combine(dropped, w, ties, False))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_dare_l1_rescale_keeps_the_l1_norm(rng) -> None:
    tau = rng.normal(size=(8, 8))
    got = merge("dare_linear", [tau], np.zeros_like(tau), density=0.3, rescale="l1")
    assert np.abs(got).sum() == pytest.approx(np.abs(tau).sum(), rel=1e-12)
    assert 0 < np.count_nonzero(got) < tau.size


def test_dare_is_independent_of_call_order(trio) -> None:
    models, base = trio
    other = [m[::-1].copy() for m in models]

    def run(name: str, ms, seed: int = 3) -> np.ndarray:
        b = base[::-1].copy() if name == "b" else base
        return MERGE_METHODS.get("dare_ties").merge(ms, b, None, name=name, seed=seed, density=0.5)

    first = (run("a", models), run("b", other))
    second = (run("b", other), run("a", models))
    np.testing.assert_array_equal(first[0], second[1])
    np.testing.assert_array_equal(first[1], second[0])
    assert not np.array_equal(run("a", models, seed=4), first[0])


def test_dare_is_unbiased_over_seeds(rng) -> None:
    tau = rng.uniform(1.0, 2.0, size=SHAPE) * rng.choice([-1.0, 1.0], size=SHAPE)
    base = np.zeros(SHAPE)
    method, n = MERGE_METHODS.get("dare_linear"), 800
    total = sum(method.merge([tau], base, None, name=NAME, seed=s, density=0.5) for s in range(n))
    # each entry: mean of n draws of τ·Bernoulli(½)/½, standard deviation |τ|/√n
    np.testing.assert_allclose(total / n, tau, atol=5 * 2.0 / math.sqrt(n))


# ── Model Breadcrumbs ───────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("method", "ties"), [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.1), (0.75, 0.25), (0.9, 0.2), (0.5, 0.0)])
def test_breadcrumbs_matches_reference(trio, method, ties, density, gamma) -> None:
    models, base = trio
    w = [1.0, 0.7, 0.4]
    got = merge(method, models, base, w, density=density, gamma=gamma)
    kept = [ref_keep_middle(t, density, gamma) for t in taus_of(models, base)]
    np.testing.assert_allclose(got, finish(base, ref_combine(kept, w, ties, False)), atol=1e-12)


def test_breadcrumbs_by_hand() -> None:
    tau = np.arange(1.0, 11.0)  # 10 entries: drop the largest 1 (gamma) and the smallest 4
    got = merge("breadcrumbs", [tau], np.zeros(10), density=0.5, gamma=0.1)
    np.testing.assert_array_equal(got, [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


# ── DELLA ───────────────────────────────────────────────────────────────────────────────────


def ref_della_probs(tau: list[float], density: float, eps: float) -> list[float]:
    order = sorted(range(len(tau)), key=lambda j: (abs(tau[j]), j))
    rank = {j: r for r, j in enumerate(order)}
    return [density - eps + 2 * eps * rank[j] / (len(tau) - 1) for j in range(len(tau))]


@pytest.mark.parametrize(("method", "ties"), [("della", True), ("della_linear", False)])
def test_della_matches_reference(trio, method: str, ties: bool) -> None:
    models, base = trio
    w = [1.0, 0.5, 0.8]
    got = merge(
        method,
        models,
        base,
        w,
        seed=5,
        density=0.5,
        epsilon=0.2,
        rank_scope="tensor",
        rescale="inverse",
    )  # the paper's 1/p (the default is mergekit's L1 rescale)
    dropped = []
    for i, tau in enumerate(taus_of(models, base)):
        probs = ref_della_probs(tau, 0.5, 0.2)
        draws = flat(keyed_generator(5, i, NAME).random(SHAPE))
        dropped.append([t / p if u < p else 0.0 for t, p, u in zip(tau, probs, draws, strict=True)])
    want = finish(base, ref_combine(dropped, w, ties, ties))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_drop_methods_default_to_mergekits_l1_rescale(method: str) -> None:
    from potluck.merging import MERGE_METHODS

    assert MERGE_METHODS.get(method).params["rescale"].default == "l1"


def test_della_keep_probability_bounds(rng) -> None:
    tau = rng.normal(size=(5, 40))
    probs = magprune_keep_probs(tau, 0.4, 0.1, "row")
    for row, p in zip(tau, probs, strict=True):
        assert p.min() == pytest.approx(0.3) and p.max() == pytest.approx(0.5)
        assert p[np.argmin(np.abs(row))] == pytest.approx(0.3)
        assert p[np.argmax(np.abs(row))] == pytest.approx(0.5)
        by_magnitude = p[np.argsort(np.abs(row))]
        assert np.all(np.diff(by_magnitude) > 0)
    whole = magprune_keep_probs(tau, 0.4, 0.1, "tensor")
    assert whole.min() == pytest.approx(0.3) and whole.max() == pytest.approx(0.5)
    assert np.unique(whole.round(12)).size == tau.size


def test_della_drops_small_entries_more_often(rng) -> None:
    tau = np.linspace(0.01, 1.0, 2000)
    got = merge("della_linear", [tau], np.zeros_like(tau), density=0.5, epsilon=0.4)
    kept = got != 0
    assert kept[:500].mean() < 0.3 < 0.7 < kept[-500:].mean()


def test_della_epsilon_out_of_range() -> None:
    base = np.zeros(SHAPE)
    with pytest.raises(UserError, match=r"density ± epsilon = \[-0.05, 0.25\] must lie in"):
        merge("della", [base + 1], base, density=0.1, epsilon=0.15)


# ── SLERP ───────────────────────────────────────────────────────────────────────────────────


def ref_slerp(t: float, a: list[float], b: list[float]) -> list[float]:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    cos = sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)
    theta = math.acos(cos)
    s0, s1 = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
    return [s0 * x + s1 * y for x, y in zip(a, b, strict=True)]


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_reference(rng, t: float) -> None:
    a, b = rng.normal(size=SHAPE), rng.normal(size=SHAPE)
    want = np.array(ref_slerp(t, flat(a), flat(b))).reshape(SHAPE)
    np.testing.assert_allclose(merge("slerp", [a, b], t=t), want, rtol=1e-10, atol=1e-12)


def test_slerp_endpoints_and_midpoint() -> None:
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    np.testing.assert_allclose(merge("slerp", [a, b], t=0.0), a, atol=1e-15)
    np.testing.assert_allclose(merge("slerp", [a, b], t=1.0), b, atol=1e-15)
    np.testing.assert_allclose(merge("slerp", [a, b]), [math.sqrt(0.5)] * 2, rtol=1e-12)


@pytest.mark.parametrize("other", [2.0, -3.0, 0.0])
def test_slerp_colinear_or_zero_falls_back_to_lerp(other: float) -> None:
    a = np.array([1.0, 2.0, 3.0])
    b = other * a
    np.testing.assert_allclose(merge("slerp", [a, b], t=0.3), 0.7 * a + 0.3 * b, rtol=1e-12)


# ── Model Stock ─────────────────────────────────────────────────────────────────────────────


def ref_model_stock(models, base) -> np.ndarray:
    taus = taus_of(models, base)
    k = len(taus)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            dot = sum(x * y for x, y in zip(taus[i], taus[j], strict=True))
            norms = math.sqrt(sum(x * x for x in taus[i]) * sum(y * y for y in taus[j]))
            cosines.append(dot / norms)
    cos = sum(cosines) / len(cosines)
    t = k * cos / ((k - 1) * cos + 1)
    avg = [sum(col) / k for col in zip(*(flat(m) for m in models), strict=True)]
    return np.array([t * a + (1 - t) * b for a, b in zip(avg, flat(base), strict=True)]).reshape(
        base.shape
    )


def test_model_stock_matches_reference(trio) -> None:
    models, base = trio
    np.testing.assert_allclose(merge("model_stock", models, base), ref_model_stock(models, base))


def test_model_stock_orthogonal_task_vectors_give_the_base() -> None:
    base = np.array([1.0, 2.0, 3.0])
    got = merge("model_stock", [base + np.eye(3)[0], base + 5 * np.eye(3)[1]], base)
    np.testing.assert_allclose(got, base, atol=1e-15)


def test_model_stock_identical_directions_give_the_average() -> None:
    base = np.zeros(3)
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(merge("model_stock", [a, b], base), (a + b) / 2, rtol=1e-12)


def test_model_stock_filter_wise_by_hand() -> None:
    base = np.zeros((2, 2))
    a, b = np.array([[1.0, 0.0], [1.0, 1.0]]), np.array([[0.0, 1.0], [2.0, 2.0]])
    got = merge("model_stock", [a, b], base, filter_wise=True)
    np.testing.assert_allclose(got, [[0.0, 0.0], [1.5, 1.5]], atol=1e-15)


def test_model_stock_opposite_task_vectors() -> None:
    base = np.zeros(2)
    with pytest.raises(UserError, match="opposite directions"):
        merge("model_stock", [base + 1.0, base - 1.0], base)
