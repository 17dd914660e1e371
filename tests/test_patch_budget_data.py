"""Budgeted patches weighted by the inputs' Gram statistics (``--gram``), and the sign codecs
(BitDelta with per-row scales, ComPEFT with its least-squares scale) as allocation candidates:
naive float64 references, exact error formulas, real files and the real CLI."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import potluck.cli.patch_cmd  # noqa: F401  (registers `potluck patch`)
from potluck.cli.main import cli
from potluck.codecs import get_codec
from potluck.codecs.sign import bitdelta_sq_error
from potluck.errors import UserError
from potluck.merging import TensorStats
from potluck.ops.merge.statsfile import load_stats, write_stats
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.budget import allocate, matrix_curve
from potluck.ops.patch.budget_sign import DENSITIES, best_density
from potluck.ops.patch.create import create_patch
from potluck.ops.patch.weights import InputWeight, input_weight


def _svd_tail(delta: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    out: np.ndarray = delta - (u[:, :r] * s[:r]) @ vt[:r]
    return out


def test_weighted_tail_equals_output_error_of_truncation() -> None:
    """Σ_{i≥r} σᵢ² gᵢ is exactly ‖(Δ − Δ_r) Xᵀ‖² (cols), ‖X (Δ − Δ_r)‖² (rows, full Gram) and
    Σⱼ cⱼ ‖(Δ − Δ_r)ⱼ‖² (rows, lookup counts)."""
    rng = np.random.default_rng(3)
    delta = rng.standard_normal((14, 9))
    x_in, x_rows = rng.standard_normal((50, 9)) * np.arange(1, 10), rng.standard_normal((30, 14))
    counts = rng.integers(0, 20, 14).astype(np.float64)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    cases: list[tuple[InputWeight, Callable[[np.ndarray], float]]] = [
        (InputWeight(x_in.T @ x_in, "cols"), lambda e: float(np.sum((e @ x_in.T) ** 2))),
        (InputWeight(x_rows.T @ x_rows, "rows"), lambda e: float(np.sum((x_rows @ e) ** 2))),
        (InputWeight(counts, "rows"), lambda e: float(np.sum(counts[:, None] * e**2))),
    ]
    for w, naive in cases:
        cum = np.concatenate([[0.0], np.cumsum(s**2 * w.direction_weights(u, vt))])
        for r in range(0, 10):
            e = _svd_tail(delta, r)
            assert w.error(e) == pytest.approx(naive(e), rel=1e-10, abs=1e-9)
            assert w.error(delta) - cum[r] == pytest.approx(naive(e), rel=1e-8, abs=1e-8)


def _names(plan: object) -> dict[str, tuple[str, str]]:
    return {n: (c.codec, repr(sorted(c.params.items()))) for n, c in plan.choices.items()}  # type: ignore[attr-defined]


def test_gram_weighting_equals_allocation_of_rescaled_deltas() -> None:
    """A Gram c·I on tensor a weighs its errors by c: the plan equals the unweighted plan of
    √c·Δ_a (naive reference), and a gets more of the budget than without weights."""
    rng = np.random.default_rng(5)
    k = 24
    deltas = {}
    for name in ("a", "b"):
        u, _ = np.linalg.qr(rng.standard_normal((40, k)))
        v, _ = np.linalg.qr(rng.standard_normal((k, k)))
        deltas[name] = ((u * 0.01 * np.arange(1, k + 1) ** -0.7) @ v.T).astype(np.float32)
    c = 9.0
    weights = {"a": InputWeight(c * np.eye(k), "cols"), "b": InputWeight(np.eye(k), "cols")}
    weighted = [matrix_curve(n, d, 0, d.nbytes, weights[n]) for n, d in deltas.items()]
    scaled = {"a": np.float32(math.sqrt(c)) * deltas["a"], "b": deltas["b"]}
    reference = [matrix_curve(n, d, 0, d.nbytes) for n, d in scaled.items()]
    plain = [matrix_curve(n, d, 0, d.nbytes) for n, d in deltas.items()]
    budget = 4000
    got, want = allocate(weighted, budget, None), allocate(reference, budget, None)
    assert _names(got) == _names(want)
    unweighted = allocate(plain, budget, None)
    assert got.choices["a"].nbytes > unweighted.choices["a"].nbytes
    assert got.choices["b"].nbytes < unweighted.choices["b"].nbytes


def test_bitdelta_row_scales_match_float64_reference() -> None:
    """Per-row BitDelta: Δ̂ᵢ = mean|Δᵢ|·sign(Δᵢ) (sign(0) = +1); its squared error is exactly
    Σᵢ (‖Δᵢ‖² − n·αᵢ²), never above the per-matrix scale's."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((6, 10)).astype(np.float32)
    delta = (rng.standard_normal((6, 10)) * np.arange(1, 7)[:, None]).astype(np.float32)
    delta[2, 3] = 0.0
    new = base + delta
    codec = get_codec("bitdelta")
    payload = codec.encode(new, base, name="w", seed=0, scales="row")
    d = (new.astype(np.float64) - base).astype(np.float32).astype(np.float64)
    alpha = np.abs(d).mean(axis=1, keepdims=True)
    ref = alpha * np.where(d >= 0, 1.0, -1.0)
    got = codec.decode(payload, base).astype(np.float64) - base
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert payload.arrays["scales"].shape == (6,)
    assert np.sum((ref - d) ** 2) == pytest.approx(bitdelta_sq_error(d), rel=1e-9)
    assert bitdelta_sq_error(d) <= bitdelta_sq_error(d.reshape(1, -1))


def test_compeft_best_density_error_is_exact_and_least() -> None:
    """ComPEFT with the least-squares scale (mean |kept Δ|): ``best_density`` names the grid
    density of least error and that error equals the codec's real error."""
    rng = np.random.default_rng(2)
    base = np.zeros((32, 20), np.float32)
    delta = (rng.standard_t(3, (32, 20)) * 0.01).astype(np.float32)
    codec = get_codec("ternary")
    errs = {}
    for d in DENSITIES:
        p = codec.encode(delta, base, name="w", seed=0, density=d, scale="mean_abs")
        errs[d] = float(np.sum((codec.decode(p, base).astype(np.float64) - delta) ** 2))
    density, err = best_density(delta)
    assert density == min(errs, key=lambda k: errs[k])
    assert err == pytest.approx(errs[density], rel=1e-5)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """base / target: ``signs.weight`` changed by ±0.01 everywhere (BitDelta stores it exactly),
    ``lin.weight`` and ``lin2.weight`` by decaying-spectrum deltas, ``emb.weight`` in 5 of 60
    rows; and a Gram statistics file (``lin2``'s inputs 1/100 of ``lin``'s in size; ``emb``:
    lookup counts)."""
    rng = np.random.default_rng(9)
    d = tmp_path_factory.mktemp("gram")
    base = {n: rng.standard_normal(s).astype(np.float32)
            for n, s in (("signs.weight", (64, 48)), ("lin.weight", (64, 48)),
                         ("lin2.weight", (64, 48)), ("emb.weight", (60, 32)))}  # fmt: skip
    target = dict(base)
    target["signs.weight"] = base["signs.weight"] + np.float32(0.01) * np.where(
        rng.random((64, 48)) < 0.5, -1, 1
    ).astype(np.float32)
    for name in ("lin.weight", "lin2.weight"):
        u, _ = np.linalg.qr(rng.standard_normal((64, 48)))
        v, _ = np.linalg.qr(rng.standard_normal((48, 48)))
        spectrum = u * 0.05 * np.arange(1, 49) ** -0.8
        target[name] = base[name] + (spectrum @ v.T).astype(np.float32)
    emb = base["emb.weight"].copy()
    emb[[1, 7, 8, 30, 59]] += rng.standard_normal((5, 32)).astype(np.float32) * 0.02
    target["emb.weight"] = emb
    save_file(base, str(d / "base.safetensors"))
    save_file(target, str(d / "target.safetensors"))
    x = rng.standard_normal((200, 48))
    write_stats(
        d / "g.stats", "gram",
        {"lin.weight": x.T @ x, "lin2.weight": x.T @ x / 100, "signs.weight": x.T @ x,
         "emb.weight": np.arange(60.0)},
        samples=10, tokens=200,
        input_axes={"lin.weight": 1, "lin2.weight": 1, "signs.weight": 1, "emb.weight": 0},
    )  # fmt: skip
    return d / "base.safetensors", d / "target.safetensors", d / "g.stats"


def test_budget_chooses_bitdelta_where_it_is_exact(models: tuple[Path, Path, Path]) -> None:
    """A ±ε delta is stored by BitDelta at 1 bit an entry with no error; ``patch info`` shows
    the codec and its predicted error; the patch applies to the target."""
    base, target, _ = models
    out = base.parent / "sign.patch"
    info = create_patch(base, target, out, budget=8000)
    chosen = {e.name: e for e in info.entries}
    assert chosen["signs.weight"].codec == "bitdelta"
    assert chosen["signs.weight"].relative_error == pytest.approx(0.0, abs=1e-4)
    res = CliRunner().invoke(cli, ["patch", "info", str(out)])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "signs.weight" in x)
    assert "bitdelta[" in line and "(predicted " in line
    apply_patch(base, out, base.parent / "applied.safetensors")
    got = load_file(str(base.parent / "applied.safetensors"))["signs.weight"]
    np.testing.assert_allclose(got, load_file(str(target))["signs.weight"], atol=1e-6)


def test_cli_gram_weights_the_plan(models: tuple[Path, Path, Path]) -> None:
    """--gram moves bytes from the layer whose inputs are small (lin2) to the one whose inputs
    are large (lin), which lowers the output error Σ‖E Xᵀ‖² of the applied patch at the same
    budget; the patch fits the budget and is deterministic."""
    base, target, stats = models
    runner = CliRunner()
    outs = []
    for extra, name in (([], "plain.patch"), (["--gram", str(stats)], "g1.patch"),
                        (["--gram", str(stats)], "g2.patch")):  # fmt: skip
        out = base.parent / name
        args = ["patch", "create", str(base), str(target), "-o", str(out), "--budget", "9000"]
        res = runner.invoke(cli, [*args, *extra, "--json"])
        assert res.exit_code == 0, res.output
        outs.append(json.loads(res.output))
        assert out.stat().st_size <= 9000
    assert (base.parent / "g1.patch").read_bytes() == (base.parent / "g2.patch").read_bytes()
    plain, gram = outs[0]["tensors"], outs[1]["tensors"]
    assert gram["lin.weight"]["bytes"] > plain["lin.weight"]["bytes"]
    assert gram["lin2.weight"]["bytes"] < plain["lin2.weight"]["bytes"]
    assert _output_error(models, "g1.patch") < _output_error(models, "plain.patch")


def _output_error(models: tuple[Path, Path, Path], patch: str) -> float:
    """Σ over the linear layers of ‖(Ŵ − W) Xᵀ‖² with the statistics' Gram matrices."""
    base, target, stats = models
    applied = base.parent / f"{patch}.safetensors"
    apply_patch(base, base.parent / patch, applied)
    got, want = load_file(str(applied)), load_file(str(target))
    st = load_stats(stats)
    total = 0.0
    for name in ("lin.weight", "lin2.weight", "signs.weight"):
        e = got[name].astype(np.float64) - want[name]
        total += float(np.sum((e @ st.get(name)) * e))  # type: ignore[operator]
    return total


def test_gram_refusals(models: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """--gram without a budget, Fisher statistics and statistics of another shape are refused
    with a clear message and no patch written."""
    base, target, stats = models
    runner = CliRunner()
    out = tmp_path / "p.patch"
    args = ["patch", "create", str(base), str(target), "-o", str(out)]
    res = runner.invoke(cli, [*args, "--gram", str(stats)])
    assert res.exit_code != 0 and "--gram needs --budget or --max-error" in res.output
    fisher = tmp_path / "f.stats"
    write_stats(fisher, "fisher", {"lin.weight": np.ones((64, 48))}, samples=1, tokens=1)
    res = runner.invoke(cli, [*args, "--budget", "x8", "--gram", str(fisher)])
    assert res.exit_code != 0 and "holds fisher statistics, not Gram matrices" in res.output
    bad = tmp_path / "bad.stats"
    write_stats(bad, "gram", {"lin.weight": np.eye(64)}, samples=1, tokens=1,
                input_axes={"lin.weight": 1})  # fmt: skip
    res = runner.invoke(cli, [*args, "--budget", "x8", "--gram", str(bad)])
    assert res.exit_code != 0
    assert "Gram statistics of 'lin.weight' have shape [64, 64], not the input size 48" in (
        res.output
    )
    assert "Traceback" not in res.output and not out.exists()
    with pytest.raises(UserError, match="are 'fisher', not a Gram matrix"):
        input_weight("w", TensorStats(np.ones((2, 2)), "fisher"), (2, 2))
