"""nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion: mergekit parity (issue 16).

Three kinds of checks:

* against real mergekit 0.1.5 (``tests/fixtures/mergekit/small/``, made by
  ``python -m bench.mergekit_fixtures --small``: small Llama-shaped models of the same four kinds
  as the other mergekit fixtures, task vectors exact in float32): the runner on each case's YAML,
  the registry tensor by tensor and the flag form of ``potluck merge``, all within 16 float32
  ulps (``tests/test_mergekit_equiv.py``'s tolerance), and ``arcee_fusion``, whose mask mergekit
  decides on float32 importances: entries near the cut may flip (see
  ``test_arcee_fusion_matches_mergekit_away_from_the_cut``);
* against naive float64 references written here, one plain numpy function per step of each
  method (loops over rows and entries where the library vectorises), on random inputs drawn from
  an explicit generator;
* bad input: each error names the parameter, the tensor or the models at fault.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.ops.merge.config import load_config
from potluck.ops.merge.run import run_merge
from tests.test_mergekit_equiv import (
    EPS32,
    FIXTURES,
    TOL_ULPS,
    assert_close,
    read_dir,
    read_safetensors,
)

SMALL = FIXTURES / "small"
CASES = sorted(p.name for p in SMALL.iterdir() if (p / "config.yaml").is_file())
#: every case but arcee_fusion (see test_arcee_fusion_matches_mergekit_away_from_the_cut)
EXACT = [c for c in CASES if c != "arcee_fusion"]


def merge(method: str, tensors: list[np.ndarray], base: np.ndarray | None = None,
          weights: list[float] | None = None, **params: Any) -> np.ndarray:  # fmt: skip
    return MERGE_METHODS.get(method).merge(tensors, base, weights, name="w", seed=0, **params)


@cache
def model(key: str) -> dict[str, np.ndarray]:
    """One input model (base, ft1, ft2, ft3) of ``small/models``."""
    return read_dir(SMALL / "models" / key)


@cache
def expected(case: str) -> dict[str, np.ndarray]:
    return read_safetensors(SMALL / case / "mergekit.safetensors")


def case_config(case: str) -> dict[str, Any]:
    data = yaml.safe_load((SMALL / case / "config.yaml").read_text())
    assert isinstance(data, dict)
    return data


def scale_of(tensor: str, want: np.ndarray) -> float:
    """Largest magnitude among the inputs' ``tensor`` and mergekit's output."""
    mags = [float(np.abs(model(k)[tensor]).max()) for k in ("base", "ft1", "ft2", "ft3")]
    return max(float(np.abs(want).max(initial=0)), *mags)


# ── against mergekit ─────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("case", EXACT)
def test_run_merge_matches_mergekit(case: str, tmp_path: Path) -> None:
    """``potluck merge CONFIG.yaml``'s runner: same tensors, vocab and values as mergekit."""
    text = (SMALL / case / "config.yaml").read_text().replace("../models/", f"{SMALL}/models/")
    (tmp_path / "c.yaml").write_text(text)
    run_merge(load_config(tmp_path / "c.yaml"), tmp_path / "out")
    got, want = read_dir(tmp_path / "out"), expected(case)
    assert sorted(got) == sorted(want)
    want_cfg = json.loads((SMALL / case / "mergekit-config.json").read_text())
    got_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert got_cfg["num_hidden_layers"] == want_cfg["num_hidden_layers"]
    for name in sorted(want):
        assert_close(got[name], want[name], scale_of(name, want[name]), f"{case} {name}")


def registry_merge(cfg: dict[str, Any], tensor: str) -> np.ndarray:
    """One tensor merged by ``MERGE_METHODS`` as mergekit reads ``cfg``: a needed or optional
    base apart from the models; karcher's base (its role ignored) the last of the models."""
    method = MERGE_METHODS.get(cfg["merge_method"])
    base_ref = cfg.get("base_model")
    entries = [e for e in cfg["models"] if e["model"] != base_ref]
    tensors = [model(Path(e["model"]).name)[tensor] for e in entries]
    weights = None
    if method.uses_weights and all("weight" in (e.get("parameters") or {}) for e in entries):
        weights = [float(e["parameters"]["weight"]) for e in entries]
    base = None if base_ref is None else model(Path(base_ref).name)[tensor]
    if method.name == "karcher" and base is not None:
        tensors, base = [*tensors, base], None
    params = cfg.get("parameters") or {}
    return merge(method.name, tensors, base, weights, **params).astype(np.float32)


@pytest.mark.parametrize("case", EXACT)
def test_registry_matches_mergekit(case: str) -> None:
    """Every tensor, merged by the registry as mergekit reads the YAML, within 16 ulps."""
    cfg, want = case_config(case), expected(case)
    assert sorted(want) == sorted(model("base"))
    for name in sorted(want):
        got = registry_merge(cfg, name)
        assert_close(got, want[name], scale_of(name, want[name]), f"{case} {name}")


def test_every_method_has_a_mergekit_case() -> None:
    methods = {case_config(c)["merge_method"] for c in CASES}
    assert methods == {"nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion"}


def test_flag_form_matches_mergekit(tmp_path: Path) -> None:
    """``potluck merge --method nuslerp --base B A1 A2 -p … --weights …`` = mergekit's YAML."""
    out, m = tmp_path / "out", SMALL / "models"
    res = CliRunner().invoke(cli, [
        "merge", "--method", "nuslerp", "--base", str(m / "base"), str(m / "ft1"), str(m / "ft2"),
        "--weights", "0.4,0.6", "-p", "nuslerp_flatten=false", "-p", "nuslerp_row_wise=true",
        "--dtype", "float32", "-o", str(out),
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    got, want = read_dir(out), expected("nuslerp_base_columns")
    assert sorted(got) == sorted(want)
    for name in sorted(want):
        assert_close(got[name], want[name], scale_of(name, want[name]), name)


def test_arcee_fusion_matches_mergekit_away_from_the_cut() -> None:
    """mergekit keeps the model's entry where its float32 importance ≥ the cut; float32 rounds
    the KL term (of nearly equal softmaxes) by ~0.2 %, so entries within 1 % of the cut may go
    either way (each is then exactly base or model); every other entry matches within 16 ulps."""
    want = expected("arcee_fusion")
    for name in sorted(want):
        base, ft = model("base")[name], model("ft1")[name]
        got = merge("arcee_fusion", [ft], base).astype(np.float32)
        imp = ref_importance(ft.astype(np.float64), base.astype(np.float64))
        cut = ref_threshold(imp)
        near = np.abs(imp - cut) <= 0.01 * cut
        scale = TOL_ULPS * EPS32 * scale_of(name, want[name])
        assert np.abs(got[~near] - want[name][~near]).max(initial=0) <= scale, name
        for side in (got[near], want[name][near]):
            assert np.all((side == base[near]) | (side == ft[near])), name


# ── naive float64 references, one function per step ─────────────────────────────────────────


def ref_unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.sqrt((v * v).sum())), 1e-7)


def ref_slerp_pair(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = min(1.0, max(-1.0, float((ref_unit(a) * ref_unit(b)).sum())))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_nuslerp(a: np.ndarray, b: np.ndarray, w: tuple[float, float], how: str) -> np.ndarray:
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    if how == "flat":
        return ref_slerp_pair(t, a.ravel(), b.ravel()).reshape(a.shape)
    if how == "rows":
        return np.stack([ref_slerp_pair(t, a[i], b[i]) for i in range(len(a))])
    return np.stack([ref_slerp_pair(t, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)


def ref_multislerp(xs: list[np.ndarray], w: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    w = w / w.sum()
    norms = [float(np.sqrt((x * x).sum())) for x in xs]
    units = [x.ravel() / (n + eps) for x, n in zip(xs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / np.sqrt((mean * mean).sum())
    tangent = sum(wi * (u - (u * mean).sum() * mean) for wi, u in zip(w, units, strict=True))
    tn = float(np.sqrt((tangent * tangent).sum())) + eps
    on_sphere = mean * math.cos(tn) + tangent * (math.sin(tn) / tn)
    scale = sum(wi * n for wi, n in zip(w, norms, strict=True))
    return np.asarray(on_sphere * scale).reshape(xs[0].shape)


def ref_karcher(xs: list[np.ndarray], max_iter: int = 10, tol: float = 1e-5) -> np.ndarray:
    norms = [float(np.sqrt((x * x).sum())) for x in xs]
    units = [x.ravel() / n for x, n in zip(xs, norms, strict=True)]
    a = 1.0 / len(xs)
    mean = np.sum([a * u for u in units], axis=0)
    mean = mean / np.sqrt((mean * mean).sum())
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for u in units:
            dot = min(1.0, max(-1.0, float((mean * u).sum())))
            theta = math.acos(dot)
            if theta >= tol:
                tangent = tangent + a * theta / math.sin(theta) * (u - dot * mean)
        tn = float(np.sqrt((tangent * tangent).sum()))
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        mean = mean / np.sqrt((mean * mean).sum())
    return np.asarray(sum(norms) * a * mean).reshape(xs[0].shape)


def ref_sce(fts: list[np.ndarray], base: np.ndarray, topk: float) -> np.ndarray:
    taus = [f - base for f in fts]
    if topk < 1:  # select: the top-k fraction of entries by variance across the models
        var = np.mean([(t - np.mean(taus, axis=0)) ** 2 for t in taus], axis=0).ravel()
        k = int(np.count_nonzero(var) * topk)
        chosen = sorted(range(var.size), key=lambda i: -var[i])[:k]
        keep = np.zeros(var.size)
        keep[chosen] = 1
        taus = [t * keep.reshape(base.shape) for t in taus]
    energy = [float((t * t).mean()) for t in taus]  # calculate
    weights = [e / sum(energy) for e in energy]
    out = np.empty(base.size)
    for i in range(base.size):  # erase, entry by entry
        vals = [float(t.ravel()[i]) for t in taus]
        sign = 1.0 if sum(vals) >= 0 else -1.0
        num = sum(w * v for w, v in zip(weights, vals, strict=True) if np.sign(v) == sign)
        den = sum(w for w, v in zip(weights, vals, strict=True) if np.sign(v) == sign)
        out[i] = float(base.ravel()[i]) + num / max(den, 1e-6)
    return out.reshape(base.shape)


def ref_nearswap(base: np.ndarray, ft: np.ndarray, t: float) -> np.ndarray:
    out = np.empty(base.size)
    for i, (a, b) in enumerate(zip(base.ravel(), ft.ravel(), strict=True)):
        w = min(1.0, max(0.0, t / max(abs(a - b), 1e-6)))
        out[i] = w * b + (1 - w) * a
    return out.reshape(base.shape)


def ref_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return np.asarray(e / e.sum())


def ref_importance(ft: np.ndarray, base: np.ndarray) -> np.ndarray:
    rows_f, rows_b = ft.reshape(-1, ft.shape[-1]), base.reshape(-1, base.shape[-1])
    out = np.empty_like(rows_f)
    for r, (f, b) in enumerate(zip(rows_f, rows_b, strict=True)):
        p, q = ref_softmax(f) + 1e-8, ref_softmax(b) + 1e-8
        out[r] = np.abs(f - b) * float((p * np.log(p / q)).sum())
    return out.reshape(ft.shape)


def ref_threshold(imp: np.ndarray) -> float:
    s = sorted(imp.ravel().tolist())
    q1, q2, q3 = (s[int(q * (len(s) - 1))] for q in (0.25, 0.5, 0.75))
    return float(q2 + 1.5 * (q3 - q1))


def ref_arcee_fusion(base: np.ndarray, ft: np.ndarray) -> np.ndarray:
    imp = ref_importance(ft, base)
    return np.where(imp >= ref_threshold(imp), ft, base)


@pytest.fixture
def draws(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """A base (9×7) and three models around it, from the explicit generator ``rng``."""
    base = rng.normal(0.0, 1.0, (9, 7))
    return base, [base + rng.normal(0.0, 0.3, (9, 7)) for _ in range(3)]


@pytest.mark.parametrize("how", ["flat", "rows", "columns"])
def test_nuslerp_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]], how: str) -> None:
    base, (a, b, _) = draws
    params = {"nuslerp_flatten": how == "flat", "nuslerp_row_wise": how == "columns"}
    got = merge("nuslerp", [a, b], None, [0.3, 0.9], **params)
    np.testing.assert_allclose(got, ref_nuslerp(a, b, (0.3, 0.9), how), rtol=1e-12, atol=1e-12)
    got = merge("nuslerp", [a, b], base, [0.3, 0.9], **params)
    want = base + ref_nuslerp(a - base, b - base, (0.3, 0.9), how)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_nuslerp_colinear_rows_and_zero_weights_fall_back() -> None:
    """Colinear vectors: LERP; weights summing to zero: t = 0.5 (both as mergekit)."""
    a = np.array([[1.0, 2.0], [3.0, -1.0]])
    got = merge("nuslerp", [a, 3 * a], None, [1.0, 1.0], nuslerp_flatten=False)
    np.testing.assert_allclose(got, 2 * a, rtol=1e-15)
    got = merge("nuslerp", [a, 3 * a], None, [1.0, -1.0])
    np.testing.assert_allclose(got, 2 * a, rtol=1e-15)


def test_multislerp_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]]) -> None:
    base, fts = draws
    w = np.array([0.2, 0.5, 0.3])
    got = merge("multislerp", fts, None, list(w))
    np.testing.assert_allclose(got, ref_multislerp(fts, w), rtol=1e-12, atol=1e-12)
    got = merge("multislerp", fts, base, list(w))
    want = base + ref_multislerp([f - base for f in fts], w)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(merge("multislerp", [fts[0]], base), fts[0])


def test_multislerp_antipodal_models() -> None:
    """Two opposite models with equal weights: LERP; three cancelling: a UserError."""
    a = np.array([1.0, -2.0, 0.5])
    np.testing.assert_array_equal(merge("multislerp", [a, -a], None, [1.0, 1.0]), np.zeros(3))
    with pytest.raises(UserError) as e:
        merge("multislerp", [a, -a, a, -a], None)
    assert e.value.message == (
        "merge method 'multislerp': tensor 'w': the weighted directions of the models cancel "
        "out (antipodal models with balancing weights), so there is no mean direction"
    )


def test_karcher_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]]) -> None:
    _, fts = draws
    np.testing.assert_allclose(merge("karcher", fts), ref_karcher(fts), rtol=1e-12, atol=1e-12)
    got = merge("karcher", fts, max_iter=3, tol=1e-9)
    np.testing.assert_allclose(got, ref_karcher(fts, 3, 1e-9), rtol=1e-12, atol=1e-12)
    zero = np.zeros((9, 7))
    np.testing.assert_array_equal(merge("karcher", [zero, zero]), zero)


@pytest.mark.parametrize("topk", [1.0, 0.4])
def test_sce_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]], topk: float) -> None:
    base, fts = draws
    got = merge("sce", fts, base, select_topk=topk)
    np.testing.assert_allclose(got, ref_sce(fts, base, topk), rtol=1e-12, atol=1e-12)


def test_nearswap_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]]) -> None:
    base, fts = draws
    got = merge("nearswap", [fts[0]], base, t=0.2)
    np.testing.assert_allclose(got, ref_nearswap(base, fts[0], 0.2), rtol=1e-13, atol=1e-13)


def test_arcee_fusion_matches_reference(draws: tuple[np.ndarray, list[np.ndarray]]) -> None:
    base, fts = draws
    np.testing.assert_array_equal(
        merge("arcee_fusion", [fts[1]], base), ref_arcee_fusion(base, fts[1])
    )


# ── bad input ────────────────────────────────────────────────────────────────────────────────


def test_nearswap_needs_t() -> None:
    with pytest.raises(UserError) as e:
        merge("nearswap", [np.ones(3)], np.zeros(3))
    assert e.value.message == "merge method 'nearswap' needs parameter 't' (it has no default)"
    assert e.value.data["param"] == "t"


@pytest.mark.parametrize(
    ("method", "param", "value"),
    [("sce", "select_topk", 1.5), ("karcher", "max_iter", -1), ("nuslerp", "nuslerp_flatten", 2)],
)
def test_parameter_errors_name_the_parameter(method: str, param: str, value: object) -> None:
    with pytest.raises(UserError) as e:
        merge(method, [np.ones(3), np.ones(3)], np.zeros(3), None, **{param: value})
    assert e.value.message == (
        f"merge method {method!r}: parameter {param!r} = {value!r} is not allowed"
    )


def test_model_counts_are_checked() -> None:
    with pytest.raises(UserError) as e:
        merge("nuslerp", [np.ones(3)], None)
    assert e.value.message == (
        "merge method 'nuslerp' needs exactly 2 model(s), got 1 for tensor 'w'"
    )
    with pytest.raises(UserError) as e:
        merge("arcee_fusion", [np.ones(3), np.ones(3)], np.zeros(3))
    assert e.value.message == (
        "merge method 'arcee_fusion' needs exactly 1 model(s), got 2 for tensor 'w'"
    )
