"""Router and mixing math (potluck.modular) against naive float64 loops and closed forms."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.modular import (
    ROUTERS,
    RouteContext,
    arrow_prototype,
    concat_factors,
    fit_softmax_router,
    lorahub_search,
    mix_outputs,
    pad_factors,
    renormalise,
    smear_factors,
    smear_outputs,
    softmax,
    softmax_router_loss,
    top_k,
)
from potluck.modular.routers import (
    ArrowRouter,
    OracleRouter,
    PhatgooseRouter,
    StaticRouter,
    UniformRouter,
)
from potluck.modular.versions import matches, parse_ref, resolve


def naive_top_k(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda e: (-row[e], e))[:k]


def naive_softmax(vals: list[float], temp: float) -> list[float]:
    m = max(vals)
    ex = [math.exp((v - m) / temp) for v in vals]
    return [x / sum(ex) for x in ex]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_top_k_ties_go_to_lower_expert() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5, 4, 3, 2, 1.0]])
    for k in (1, 2, 3, 5):
        idx, vals = top_k(scores, k)
        for t, row in enumerate(scores.tolist()):
            assert idx[t].tolist() == naive_top_k(row, k)
            assert vals[t].tolist() == [row[e] for e in naive_top_k(row, k)]
    with pytest.raises(UserError, match="top_k=6 but there are 5 experts"):
        top_k(scores, 6)


def test_softmax_and_renormalise_match_naive(rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 3)) * 10
    for temp in (0.5, 1.0, 3.0):
        got = softmax(x, temp)
        for t in range(4):
            assert got[t].tolist() == pytest.approx(naive_softmax(x[t].tolist(), temp), rel=1e-12)
    w = np.array([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert renormalise(w).tolist() == [[0.25, 0.75, 0.0], [1 / 3, 1 / 3, 1 / 3]]
    with pytest.raises(UserError, match="temperature must be > 0"):
        softmax(x, 0.0)


def test_arrow_prototype_is_top_right_singular_vector(rng: np.random.Generator) -> None:
    for r, n_in, n_out in ((1, 7, 5), (4, 16, 9), (3, 5, 12)):
        a, b = rng.normal(size=(r, n_in)), rng.normal(size=(n_out, r))
        _u, _s, vt = np.linalg.svd(b @ a)
        p = arrow_prototype(a, b)
        assert abs(float(p @ vt[0])) == pytest.approx(1.0, abs=1e-10)
        assert float(np.linalg.norm(p)) == pytest.approx(1.0, abs=1e-12)
        assert p[np.argmax(np.abs(p))] > 0
    with pytest.raises(UserError, match="update is zero"):
        arrow_prototype(np.zeros((2, 4)), np.ones((3, 2)))


def test_arrow_router_matches_naive_loop(rng: np.random.Generator) -> None:
    protos = np.stack(
        [arrow_prototype(rng.normal(size=(2, 6)), rng.normal(size=(4, 2))) for _ in range(4)]
    )
    h = rng.normal(size=(9, 6))
    router = ArrowRouter(protos, top_k=2, temperature=0.7)
    idx, w = router.select(h)
    for t in range(9):
        logits = [abs(sum(h[t, i] * protos[e, i] for i in range(6))) for e in range(4)]
        sel = naive_top_k(logits, 2)
        assert idx[t].tolist() == sel
        assert w[t].tolist() == pytest.approx(
            naive_softmax([logits[e] for e in sel], 0.7), rel=1e-10
        )


def test_phatgoose_router_matches_naive_loop(rng: np.random.Generator) -> None:
    d = 8
    gates = rng.normal(size=(3, d))
    h = rng.normal(size=(5, d)) * 3 + 1

    def std(v: list[float]) -> list[float]:
        mu, var = statistics.fmean(v), statistics.pvariance(v)
        return [(x - mu) / math.sqrt(var + 1e-5) for x in v]

    router = PhatgooseRouter(gates)  # defaults: top-2, temperature √d
    assert (router.k, router.temperature) == (2, math.sqrt(d))
    idx, w = router.select(h)
    sg = [std(g.tolist()) for g in gates]
    for t in range(5):
        sh = std(h[t].tolist())
        logits = [sum(x * y for x, y in zip(sh, g, strict=True)) for g in sg]
        sel = naive_top_k(logits, 2)
        assert idx[t].tolist() == sel
        want = naive_softmax([logits[e] for e in sel], math.sqrt(d))
        assert w[t].tolist() == pytest.approx(want, rel=1e-10)


def test_example_granularity_routes_the_mean_state(rng: np.random.Generator) -> None:
    protos = rng.normal(size=(3, 4))
    h = rng.normal(size=(7, 4))
    ex = np.array([0, 0, 0, 1, 1, 2, 2])
    router = ArrowRouter(protos, top_k=2, granularity="example")
    idx, w = router.select(h, RouteContext(example_index=ex))
    token_router = ArrowRouter(protos, top_k=2)
    for e in range(3):
        mean = h[ex == e].mean(axis=0, keepdims=True)
        i1, w1 = token_router.select(mean)
        for t in np.flatnonzero(ex == e):
            assert idx[t].tolist() == i1[0].tolist()
            assert w[t].tolist() == pytest.approx(w1[0].tolist(), rel=1e-12)


def test_uniform_oracle_static_routers() -> None:
    h = np.zeros((3, 2))
    idx, w = UniformRouter(4).select(h)
    assert idx.tolist() == [[0, 1, 2, 3]] * 3 and w.tolist() == [[0.25] * 4] * 3
    oracle = OracleRouter([["sst2", "imdb"], ["ag_news"]])
    ctx = RouteContext(example_index=np.array([0, 0, 1]), task_names=["ag_news", "imdb"])
    idx, w = oracle.select(h, ctx)
    assert idx.tolist() == [[1], [1], [0]] and w.tolist() == [[1.0]] * 3
    with pytest.raises(UserError, match="no expert serves task 'qa'"):
        oracle.select(h, RouteContext(example_index=np.zeros(3, np.int64), task_names=["qa"]))
    idx, w = StaticRouter([0.2, -0.9, 0.5], top_k=2).select(h)
    assert idx.tolist() == [[1, 2]] * 3 and w.tolist() == [[-0.9, 0.5]] * 3


def test_mixing_matches_naive_loops(rng: np.random.Generator) -> None:
    factors = [(rng.normal(size=(r, 5)), rng.normal(size=(3, r))) for r in (2, 1, 3)]
    a, b = pad_factors(factors)
    assert a.shape == (3, 3, 5) and b.shape == (3, 3, 3)
    for e, (fa, fb) in enumerate(factors):
        np.testing.assert_allclose(b[e] @ a[e], fb @ fa, rtol=0, atol=1e-13)
    x = rng.normal(size=(4, 5))
    w = rng.random(size=(4, 3))
    out = mix_outputs(x, a, b, w)
    smear = smear_outputs(x, a, b, w)
    for t in range(4):
        want = sum(w[t, e] * (fb @ (fa @ x[t])) for e, (fa, fb) in enumerate(factors))
        np.testing.assert_allclose(out[t], want, rtol=1e-12, atol=1e-12)
        # SMEAR: run the single expert whose factors are the weighted averages
        a_bar = sum(w[t, e] * a[e] for e in range(3))
        b_bar = sum(w[t, e] * b[e] for e in range(3))
        np.testing.assert_allclose(smear[t], b_bar @ (a_bar @ x[t]), rtol=1e-12, atol=1e-12)
        ma, mb = smear_factors(a, b, w[t])
        np.testing.assert_allclose(mb @ (ma @ x[t]), smear[t], rtol=1e-12, atol=1e-12)
    weights = [0.5, 0.0, -1.25]
    ca, cb = concat_factors(factors, weights)
    assert ca.shape == (5, 5) and cb.shape == (3, 5)  # the zero-weight expert is dropped
    want = sum(wt * (fb @ fa) for wt, (fa, fb) in zip(weights, factors, strict=True))
    np.testing.assert_allclose(cb @ ca, want, rtol=1e-12, atol=1e-12)


def test_lorahub_search_is_seeded_and_finds_the_minimum() -> None:
    target = np.array([0.7, -0.4, 1.1])

    def loss(w: np.ndarray) -> float:
        return float(np.sum((w - target) ** 2))

    r1 = lorahub_search(loss, 3, seed=3, budget=400, l1=0.0)
    r2 = lorahub_search(loss, 3, seed=3, budget=400, l1=0.0)
    assert r1.weights.tolist() == r2.weights.tolist() and r1.evaluations <= 400
    np.testing.assert_allclose(r1.weights, target, atol=2e-3)
    assert r1.objective == pytest.approx(loss(r1.weights))
    small = lorahub_search(loss, 3, seed=3, budget=5)
    assert small.evaluations == 5


def test_softmax_router_gradient_and_fit(rng: np.random.Generator) -> None:
    h = rng.normal(size=(12, 4))
    y = rng.integers(0, 3, size=12)
    w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    _loss, gw, gb = softmax_router_loss(w, b, h, y, 0.1)
    eps = 1e-6
    for i, j in ((0, 0), (2, 3), (1, 2)):
        wp, wm = w.copy(), w.copy()
        wp[i, j] += eps
        wm[i, j] -= eps
        num = (
            softmax_router_loss(wp, b, h, y, 0.1)[0] - softmax_router_loss(wm, b, h, y, 0.1)[0]
        ) / (2 * eps)
        assert gw[i, j] == pytest.approx(num, rel=1e-5, abs=1e-8)
    bp = b.copy()
    bp[1] += eps
    num = (softmax_router_loss(w, bp, h, y, 0.1)[0] - softmax_router_loss(w, b, h, y, 0.1)[0]) / eps
    assert gb[1] == pytest.approx(num, rel=1e-4, abs=1e-6)
    centers = np.eye(3, 4) * 4
    labels = np.repeat(np.arange(3), 10)
    pts = centers[labels] + rng.normal(size=(30, 4)) * 0.3
    fw, fb = fit_softmax_router(pts, labels, 3)
    router = ROUTERS.get("learned").build(
        3, {"router_weight": fw, "router_bias": fb, "top_k": 1}, []
    )
    idx, _ = router.select(pts)
    assert idx[:, 0].tolist() == labels.tolist()


def test_router_registry_and_settings() -> None:
    assert ROUTERS.names() == [
        "arrow",
        "learned",
        "oracle",
        "phatgoose",
        "smear",
        "static",
        "uniform",
    ]
    with pytest.raises(UserError, match="unknown router 'arow'") as e:
        ROUTERS.get("arow")
    assert "did you mean 'arrow'" in str(e.value)
    with pytest.raises(UserError, match="needs Arrow prototypes for every expert; expert #1"):
        ROUTERS.get("arrow").build(2, {}, [np.ones(3), None])
    with pytest.raises(UserError, match="top_k=3 but the uniform router has 2 experts"):
        ROUTERS.get("uniform").build(2, {"top_k": 3}, [])
    with pytest.raises(UserError, match="unknown granularity 'sentence'"):
        ROUTERS.get("uniform").build(2, {"granularity": "sentence"}, [])


def test_versions_and_constraints() -> None:
    assert matches("1.2", "==1.2.0") and matches("1.2.5", "==1.2.*") and matches("1.2", "1.2")
    assert matches("1.5", ">=1.0,<2") and not matches("2.0", ">=1.0,<2")
    assert not matches("1.3", "!=1.3") and matches("0.1", "*")
    assert resolve("x", ">=1.0,<2", ["0.9", "1.0", "1.10", "1.9", "2.0"]) == "1.10"
    assert parse_ref("sent@>=1, <2") == ("sent", ">=1, <2") and parse_ref("a") == ("a", "*")
    with pytest.raises(UserError, match="no version of expert 'x' satisfies '>=3'"):
        resolve("x", ">=3", ["1.0"])
    with pytest.raises(UserError, match=r"invalid version constraint '~=1\.2'"):
        parse_ref("x@~=1.2")


def test_router_defaults_apply_when_settings_are_none() -> None:
    gates = np.arange(12, dtype=np.float64).reshape(3, 4) ** 2
    r = ROUTERS.get("phatgoose").build(3, {"top_k": None, "temperature": None}, list(gates))
    assert (r.k, r.temperature) == (2, 2.0)
    assert ROUTERS.get("oracle").build(2, {"top_k": None, "tasks": [["x"], ["y"]]}, []).k == 1
    assert ROUTERS.get("uniform").build(3, {"top_k": None}, []).k == 3
