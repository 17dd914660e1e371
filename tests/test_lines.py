"""LiNeS (Wang et al., ICLR 2025): the merged task vector scaled by layer depth, α + β·ℓ/(L − 1)
in the layers and α elsewhere, composed with task arithmetic, TIES (whole and row-blocked) and
TSV; YAML, ``--lines`` and ``-p lines=…`` forms; bad input refused before any tensor is read."""

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
from potluck.merging.blockwise import blockwise
from potluck.merging.lines import layer_depth
from potluck.ops.merge.config import parse_config
from potluck.ops.merge.run import explain_merge, run_merge
from potluck.ops.models.sources import open_path

LAYERS = 4
SHAPES = {
    "embeddings.word_embeddings.weight": (30, 6),
    **{f"encoder.layer.{i}.attention.self.query.weight": (6, 6) for i in range(LAYERS)},
    **{f"encoder.layer.{i}.output.dense.bias": (6,) for i in range(LAYERS)},
    "pooler.dense.weight": (6, 6),
}


def _scale(name: str, alpha: float, beta: float) -> float:
    """The paper's λ(ℓ), written out independently of potluck's parser."""
    for i in range(LAYERS):
        if f".layer.{i}." in name:
            return alpha + beta * i / (LAYERS - 1)
    return alpha


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(11)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out = {"base": base}
    for i in range(3):
        out[f"ft{i}"] = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32)
                         for k, v in base.items()}  # fmt: skip
    for name, tensors in out.items():
        (tmp_path / name).mkdir()
        save_st(tmp_path / name / "model.safetensors", tensors)
        (tmp_path / name / "config.json").write_text(json.dumps({"num_hidden_layers": LAYERS}))
    monkeypatch.chdir(tmp_path)
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    with open_path(path) as src:
        return {n: np.array(src.read(n)) for n in src.names()}


def test_layer_depth_reads_the_common_layer_spellings() -> None:
    assert layer_depth("model.layers.3.mlp.up_proj.weight") == 3
    assert layer_depth("encoder.layer.11.output.dense.weight") == 11
    assert layer_depth("transformer.h.2.attn.c_attn.weight") == 2
    assert layer_depth("blocks.4.attn.qkv.weight") == 4
    assert layer_depth("embeddings.word_embeddings.weight") is None
    assert layer_depth("model.norm.weight") is None


def test_task_arithmetic_with_lines_is_the_papers_layer_scaling(
    models: dict[str, dict[str, np.ndarray]],
) -> None:
    """YAML ``lines: {alpha: 0.3, beta: 0.6}``: θ = θ_base + λ(ℓ)·Σᵢ τᵢ, in float64, per tensor."""
    config = parse_config({
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": [{"model": f"ft{i}"} for i in range(3)],
        "parameters": {"lines": {"alpha": 0.3, "beta": 0.6}},
    })  # fmt: skip
    run_merge(config, "out")
    got = _read(Path("out"))
    for name in SHAPES:
        b = models["base"][name].astype(np.float64)
        taus = sum(models[f"ft{i}"][name].astype(np.float64) - b for i in range(3))
        want = (b + _scale(name, 0.3, 0.6) * taus).astype(np.float32)
        np.testing.assert_allclose(got[name], want, rtol=2**-23, atol=0)


def test_flag_forms_and_yaml_give_the_same_tsv_merge_and_explain_shows_each_scale(
    models: dict[str, dict[str, np.ndarray]],
) -> None:
    """``--lines 0.2,0.8``, ``-p lines={alpha: 0.2, beta: 0.8}`` and TSV's own result rescaled:
    θ_base + λ(ℓ)·(θ_tsv − θ_base), bit for bit."""
    common = ["merge", "--method", "tsv", "--base", "base", "ft0", "ft1", "ft2"]
    res = CliRunner().invoke(cli, [*common, "--lines", "0.2,0.8", "-o", "a"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, [*common, "-p", "lines={alpha: 0.2, beta: 0.8}", "-o", "b"])
    assert res.exit_code == 0, res.output
    a, b = _read(Path("a")), _read(Path("b"))
    tsv = MERGE_METHODS.get("tsv")
    for name in SHAPES:
        base = models["base"][name]
        ins = [models[f"ft{i}"][name] for i in range(3)]
        merged = tsv.merge(ins, base, None, name=name, seed=0)
        want = base + _scale(name, 0.2, 0.8) * (merged - base)
        np.testing.assert_array_equal(a[name], want.astype(np.float32))
        np.testing.assert_array_equal(b[name], a[name])
    res = CliRunner().invoke(cli, [*common, "--lines", "0.2,0.8", "--explain", "--json"])
    scales = {t["tensor"]: t["params"]["lines"] for t in json.loads(res.output)["tensors"]}
    assert scales == {n: pytest.approx(_scale(n, 0.2, 0.8), abs=1e-15) for n in SHAPES}


def test_blocked_ties_with_trimming_applies_the_scale_as_the_whole_tensor_does() -> None:
    """The row-block path of TIES with density < 1 (huge embeddings) scales like ``merge``."""
    rng = np.random.default_rng(12)
    base = rng.standard_normal((40, 5))
    models = [base + 0.1 * rng.standard_normal(base.shape) for _ in range(3)]
    ties = MERGE_METHODS.get("ties")
    params = {"density": 0.3, "lines": 0.45}
    whole = ties.merge(models, base, None, name="e", seed=0, **params)
    bm = blockwise(ties, params, None, name="e", seed=0)
    assert bm is not None and bm.trim_density == (0.3,)
    bm.prepare(models, base)
    blocks = [bm.block([m[r : r + 7] for m in models], base[r : r + 7]) for r in range(0, 40, 7)]
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    plain = ties.merge(models, base, None, name="e", seed=0, density=0.3)
    np.testing.assert_allclose(whole, base + 0.45 * (plain - base), rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"parameters": {"lines": {"alpha": 0.5}}},
         r"lines must be a mapping with exactly alpha and beta, not \{'alpha': 0\.5\}"),
        ({"parameters": {"lines": {"alpha": 0.5, "beta": "x"}}},
         r"lines\.beta must be a finite number, not 'x'"),
        ({"merge_method": "linear", "parameters": {"lines": {"alpha": 0.5, "beta": 0.5}}},
         r"merge method 'linear' has no parameter 'lines'"),
        ({"models": [{"model": "ft0", "parameters": {"lines": 0.5}}, {"model": "ft1"}]},
         r"parameter 'lines' of 'ties' applies to all models, but is set for one model"),
    ],
)  # fmt: skip
def test_bad_lines_settings_are_refused_before_merging(
    models: dict[str, dict[str, np.ndarray]], data: dict[str, object], message: str
) -> None:
    config = {"merge_method": "ties", "base_model": "base",
              "models": [{"model": "ft0"}, {"model": "ft1"}], **data}  # fmt: skip
    with pytest.raises(UserError, match=message):
        explain_merge(parse_config(config))
    assert not Path("out").exists()


def test_bad_lines_flags_say_what_to_write(models: dict[str, dict[str, np.ndarray]]) -> None:
    res = CliRunner().invoke(
        cli, ["merge", "--method", "ties", "--base", "base", "ft0", "--lines", "0.5", "-o", "o"]
    )
    assert res.exit_code != 0 and not Path("o").exists()
    assert "--lines '0.5': expected two numbers ALPHA,BETA" in res.output
    Path("c.yaml").write_text("merge_method: ties\nbase_model: base\nmodels: [ft0]\n")
    res = CliRunner().invoke(cli, ["merge", "c.yaml", "o", "--lines", "0.5,1"])
    assert res.exit_code != 0 and "--lines is a flag-form option" in res.output
    assert "Traceback" not in res.output
