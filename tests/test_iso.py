"""Iso-C and Iso-CTS (Marczak et al., ICML 2025) against a naive float64 transcription of the
paper's steps, worked cases with closed forms, and the flag form of ``potluck merge``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import potluck.cli.merge_cmd  # noqa: F401  (registers the command)
from conftest import save_st
from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.ops.models.sources import open_path

ISO_C = MERGE_METHODS.get("iso_c")
ISO_CTS = MERGE_METHODS.get("iso_cts")


def _polar(x: np.ndarray) -> np.ndarray:
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def _naive_iso_c(base: np.ndarray, taus: list[np.ndarray], alpha: float) -> np.ndarray:
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    return base + alpha * u @ np.diag(np.full(s.size, s.mean())) @ vt


def _naive_iso_cts(base: np.ndarray, taus: list[np.ndarray], alpha: float, f: float) -> np.ndarray:
    r, t = min(base.shape), len(taus)
    k_c = int(r * f)
    k_c = r - round((r - k_c) / t) * t
    s_t = (r - k_c) // t
    u, s, vt = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vt[:k_c]]
    for tau in taus:
        resid = tau - u[:, :k_c] @ u[:, :k_c].T @ tau
        ui, si, vti = np.linalg.svd(resid, full_matrices=False)
        us.append(ui[:, :s_t])
        ss.append(si[:s_t])
        vs.append(vti[:s_t])
    big_u, big_v = _polar(np.hstack(us)), _polar(np.vstack(vs).T)
    return base + alpha * np.concatenate(ss).mean() * big_u @ big_v.T


def _random(shape: tuple[int, ...], tasks: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(shape)
    return base, [0.1 * rng.standard_normal(shape) for _ in range(tasks)]


@pytest.mark.parametrize("svd", ["fast", "exact"])
@pytest.mark.parametrize("shape", [(30, 20), (12, 25)])
def test_iso_c_matches_the_naive_reference(svd: str, shape: tuple[int, int]) -> None:
    base, taus = _random(shape, 3, seed=1)
    got = ISO_C.merge([base + t for t in taus], base, None, name="w", seed=0, alpha=1.3, svd=svd)
    np.testing.assert_allclose(got, _naive_iso_c(base, taus, 1.3), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("svd", ["fast", "exact"])
@pytest.mark.parametrize(("shape", "tasks", "f"), [((30, 20), 3, 0.8), ((16, 40), 4, 0.5)])
def test_iso_cts_matches_the_naive_reference(
    svd: str, shape: tuple[int, int], tasks: int, f: float
) -> None:
    """(30, 20), T = 3, f = 0.8: k_c = 16 → 17, s = 1; (16, 40), T = 4, f = 0.5: k_c = 8, s = 2."""
    base, taus = _random(shape, tasks, seed=2)
    models = [base + t for t in taus]
    got = ISO_CTS.merge(models, base, None, name="w", seed=0, alpha=0.9,
                        common_space_fraction=f, svd=svd)  # fmt: skip
    np.testing.assert_allclose(got, _naive_iso_cts(base, taus, 0.9, f), rtol=1e-9, atol=1e-12)


def test_iso_c_worked_case_flattens_the_spectrum() -> None:
    """Δ = diag(3, 1): σ̄ = 2, U = V = I, so the update is 2·I."""
    base = np.zeros((2, 2))
    got = ISO_C.merge([np.diag([3.0, 0.0]), np.diag([0.0, 1.0])], base, None, name="w", seed=0)
    np.testing.assert_allclose(got, 2.0 * np.eye(2), atol=1e-14)


def test_iso_cts_closed_form_for_tasks_in_orthogonal_subspaces() -> None:
    """Two tasks on disjoint singular directions, σ = (10, 8, 6, 4, 1) and (9, 7, 5, 3, 2),
    r = 10, f = 0.8: the common subspace takes the top 8 of the sum, each task adds back its own
    smallest direction, so the update is mean(1..10) · Σⱼ qⱼ·pⱼᵀ = 5.5 · Q·Pᵀ."""
    rng = np.random.default_rng(3)
    q, _ = np.linalg.qr(rng.standard_normal((14, 10)))
    pm, _ = np.linalg.qr(rng.standard_normal((10, 10)))
    t1 = (q[:, :5] * [10.0, 8.0, 6.0, 4.0, 1.0]) @ pm[:, :5].T
    t2 = (q[:, 5:] * [9.0, 7.0, 5.0, 3.0, 2.0]) @ pm[:, 5:].T
    base = rng.standard_normal((14, 10))
    for svd in ("fast", "exact"):
        got = ISO_CTS.merge([base + t1, base + t2], base, None, name="w", seed=0, svd=svd)
        np.testing.assert_allclose(got, base + 5.5 * q @ pm.T, rtol=1e-10, atol=1e-12)


def test_iso_cts_with_the_whole_rank_common_is_iso_c() -> None:
    base, taus = _random((18, 12), 3, seed=4)
    models = [base + t for t in taus]
    cts = ISO_CTS.merge(models, base, None, name="w", seed=0, common_space_fraction=1.0)
    np.testing.assert_allclose(cts, ISO_C.merge(models, base, None, name="w", seed=0),
                               rtol=1e-12, atol=1e-13)  # fmt: skip


def test_vectors_take_the_weighted_mean_and_rank_deficient_sums_add_no_null_directions() -> None:
    """A bias: α·mean of wᵢτᵢ. A rank-1 sum in 5 × 4: only its own direction, scaled by σ̄ =
    σ₁/4 (the mean over all four singular values), never arbitrary null directions."""
    base = np.array([1.0, 2.0, 3.0])
    t0, t1 = np.array([1.0, 0.0, 2.0]), np.array([3.0, -2.0, 0.0])
    for method in (ISO_C, ISO_CTS):
        got = method.merge([base + t0, base + t1], base, [1.0, 0.5], name="b", seed=0, alpha=2.0)
        np.testing.assert_allclose(got, base + 2.0 * (t0 + 0.5 * t1) / 2, rtol=1e-15)
    a, b = np.array([1.0, 2.0, 0, 0, 2.0]), np.array([0, 3.0, 0, 4.0])
    rank1 = np.outer(a, b)  # σ₁ = 3·5 = 15
    got = ISO_C.merge([rank1, np.zeros((5, 4))], np.zeros((5, 4)), None, name="w", seed=0)
    np.testing.assert_allclose(got, (15.0 / 4) * np.outer(a / 3, b / 5), atol=1e-12)


def test_bad_parameters_are_refused_with_the_valid_range() -> None:
    base = np.zeros((3, 2))
    with pytest.raises(UserError, match=r"'common_space_fraction' = 1\.5 is not allowed") as e:
        ISO_CTS.merge([base], base, None, name="w", seed=0, common_space_fraction=1.5)
    assert e.value.hint is not None and "[0, 1]" in e.value.hint
    with pytest.raises(UserError, match=r"merge method 'iso_c' needs a base model \(tensor 'w'"):
        ISO_C.merge([base, base], None, None, name="w", seed=0)


SHAPES = {
    "embeddings.word_embeddings.weight": (60, 8),
    "encoder.layer.0.attention.self.query.weight": (8, 8),
    "encoder.layer.0.attention.self.query.bias": (8,),
    "encoder.layer.1.attention.self.query.weight": (8, 8),
    "encoder.layer.1.intermediate.dense.weight": (16, 8),
    "pooler.dense.weight": (8, 8),
}


def _write_models(root: Path, n: int) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out = {"base": base}
    for i in range(n):
        out[f"ft{i}"] = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                         for k, v in base.items()}  # fmt: skip
    for name, tensors in out.items():
        (root / name).mkdir()
        save_st(root / name / "model.safetensors", tensors)
        (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    return out


@pytest.mark.parametrize(
    ("method", "params"), [("iso_c", {"alpha": 1.2}), ("iso_cts", {"common_space_fraction": 0.5})]
)
def test_flag_form_merges_real_files_as_the_method_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, float]
) -> None:  # fmt: skip
    models = _write_models(tmp_path, 3)
    monkeypatch.chdir(tmp_path)
    flags = [x for k, v in params.items() for x in ("-p", f"{k}={v}")]
    res = CliRunner().invoke(
        cli, ["merge", "--method", method, "--base", "base", "ft0", "ft1", "ft2", "-o", "out",
              *flags],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    with open_path(tmp_path / "out") as src:
        got = {n: np.array(src.read(n)) for n in src.names()}
    assert sorted(got) == sorted(SHAPES)
    impl = MERGE_METHODS.get(method)
    for name in SHAPES:
        ins = [models[f"ft{i}"][name] for i in range(3)]
        want = impl.merge(ins, models["base"][name], None, name=name, seed=0, **params)
        np.testing.assert_array_equal(got[name], want.astype(np.float32))
