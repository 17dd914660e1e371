"""`potluck merge`: mergekit YAML semantics, the per-tensor plan, the streamed executor, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import potluck.cli.merge_cmd  # noqa: F401  (registers the command)
from conftest import Run, save_st
from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.ops.merge import run as mergerun
from potluck.ops.merge.config import evaluate_setting, parse_config
from potluck.ops.merge.plan import layer_index, plan_merge
from potluck.ops.merge.run import explain_merge, run_merge
from potluck.ops.models.sources import open_path

SHAPES = {
    "model.embed_tokens.weight": (40, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.1.self_attn.q_proj.weight": (8, 8),
    "model.layers.1.mlp.up_proj.weight": (12, 8),
    "model.layers.2.self_attn.q_proj.weight": (8, 8),
    "model.layers.2.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (40, 8),
}


def _models(root: Path, n: int = 3, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    out = {"base": base}
    for i in range(n):
        out[f"ft{i}"] = {
            k: (v + rng.standard_normal(v.shape) * 0.1).astype(np.float32) for k, v in base.items()
        }
    for name, tensors in out.items():
        (root / name).mkdir()
        save_st(root / name / "model.safetensors", tensors)
        (root / name / "config.json").write_text(
            json.dumps({"num_hidden_layers": 3, "torch_dtype": "float32"})
        )
    return out


def _read(path: Path) -> dict[str, np.ndarray]:
    with open_path(path) as src:
        return {n: np.array(src.read(n)) for n in src.names()}


# ---------------------------------------------------------------- settings (mergekit semantics)


def test_gradient_interpolates_over_depth() -> None:
    assert evaluate_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate_setting([1.0, 0.5, 0.0], "x", 0.75) == pytest.approx(0.25)
    assert evaluate_setting([1.0, 0.5, 0.0], "x", 1.0) == 0.0
    assert evaluate_setting(["a", "b", "c"], "x", 0.6) == "b"  # index floor(0.6 * 2) = 1
    assert evaluate_setting(0.3, "x", 0.9) == 0.3


def test_conditions_take_first_matching_filter() -> None:
    setting = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"filter": "mlp", "value": 0.7},
               {"value": 0.1}]  # fmt: skip
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj", 0.5) == 0.7
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.1
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "norm", 0) is None


def test_config_errors_name_the_problem() -> None:
    with pytest.raises(UserError, match="unknown key"):
        parse_config({"merge_method": "ties", "models": ["a"], "modles": []})
    with pytest.raises(UserError, match="exactly one of `models` or `slices`"):
        parse_config({"merge_method": "ties"})
    with pytest.raises(UserError, match="layer_range"):
        bad = [{"sources": [{"model": "a", "layer_range": [3, 1]}]}]
        parse_config({"merge_method": "passthrough", "slices": bad})
    with pytest.raises(UserError, match="same number of layers"):
        srcs = [{"model": "a", "layer_range": [0, 2]}, {"model": "b", "layer_range": [0, 3]}]
        parse_config({"merge_method": "slerp", "slices": [{"sources": srcs}]})


def test_layer_index() -> None:
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None


# ---------------------------------------------------------------- plan


def test_plan_resolves_per_tensor_parameters_like_mergekit(tmp_path: Path) -> None:
    _models(tmp_path)
    config = parse_config({
        "merge_method": "ties", "base_model": "base",
        "models": [
            {"model": "ft0", "parameters": {"weight": [1.0, 0.0], "density": 0.5}},
            {"model": "ft1", "parameters": {"weight": [{"filter": "mlp", "value": 0.2},
                                                       {"value": 1.0}], "density": 0.5}},
            {"model": "base"},
        ],
        "parameters": {"lambda": 0.9, "int8_mask": True},
    }, root=tmp_path)  # fmt: skip
    plan = explain_merge(config)
    jobs = {j.out.name: j for j in plan.jobs}
    # layers 0, 1, 2 → t = 0, 0.5, 1; before the layers t = 0, after them t = 1 (mergekit)
    assert jobs["model.layers.1.mlp.up_proj.weight"].weights == (0.5, 0.2)
    assert jobs["model.layers.2.self_attn.q_proj.weight"].weights == (0.0, 1.0)
    assert jobs["model.embed_tokens.weight"].weights == (1.0, 1.0)
    assert jobs["lm_head.weight"].weights == (0.0, 1.0)
    job = jobs["model.layers.0.self_attn.q_proj.weight"]
    assert job.params == {"density": 0.5, "lambda_": 0.9}
    assert job.base is not None and job.base[0].endswith("base")  # the base is not a model
    assert [Path(m).name for m, _ in job.models] == ["ft0", "ft1"]
    assert "int8_mask" not in job.params  # accepted (it only saves memory in mergekit)


def test_plan_refuses_unknown_parameter_listing_valid_ones(tmp_path: Path) -> None:
    _models(tmp_path)
    config = parse_config({"merge_method": "ties", "base_model": "base",
                           "models": [{"model": "ft0", "parameters": {"denisty": 0.5}}]},
                          root=tmp_path)  # fmt: skip
    with pytest.raises(UserError, match="no parameter 'denisty'") as e:
        explain_merge(config)
    assert "density" in (e.value.hint or "")


def test_plan_refuses_mismatched_models(tmp_path: Path) -> None:
    m = _models(tmp_path)
    bad = dict(m["ft1"])
    bad["model.norm.weight"] = np.zeros(9, np.float32)
    save_st(tmp_path / "ft1" / "model.safetensors", bad)
    config = parse_config({"merge_method": "linear", "models": ["ft0", "ft1"]}, root=tmp_path)
    with pytest.raises(UserError, match="different shapes"):
        explain_merge(config)
    extra = dict(m["ft1"])
    extra["extra.bias"] = np.zeros(3, np.float32)
    save_st(tmp_path / "ft1" / "model.safetensors", extra)
    with pytest.raises(UserError, match=r"lack: extra\.bias"):
        explain_merge(config)
    missing = {k: v for k, v in m["ft1"].items() if k != "model.norm.weight"}
    save_st(tmp_path / "ft1" / "model.safetensors", missing)
    with pytest.raises(UserError, match=r"no tensor named 'model\.norm\.weight'"):
        explain_merge(config)


def test_plan_passes_per_model_densities(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "ties", "base_model": "base", "models": [
        {"model": "ft0", "parameters": {"density": 0.5}},
        {"model": "ft1", "parameters": {"density": [0.2, 0.8]}},
        {"model": "ft2"}]}, root=tmp_path)  # fmt: skip
    jobs = {j.out.name: j for j in explain_merge(config).jobs}
    assert jobs["model.layers.1.mlp.up_proj.weight"].params["density"] == (0.5, 0.5, 1.0)
    assert jobs["model.layers.2.mlp.up_proj.weight"].params["density"] == (0.5, 0.8, 1.0)
    run_merge(config, tmp_path / "out")
    got = _read(tmp_path / "out")
    name = "model.layers.0.mlp.up_proj.weight"
    base = m["base"][name].astype(np.float64)
    taus = [m[f"ft{i}"][name].astype(np.float64) - base for i in range(3)]
    kept = []
    for tau, d in zip(taus, (0.5, 0.2, 1.0), strict=True):  # naive top-k per model
        k = int(d * tau.size + 1e-9)
        order = np.argsort(-np.abs(tau), axis=None, kind="stable")[:k]
        out = np.zeros(tau.size)
        out[order] = tau.reshape(-1)[order]
        kept.append(out.reshape(tau.shape))
    total = sum(kept)
    sign = np.where(total >= 0, 1.0, -1.0)
    agree = [np.where(np.sign(x) == sign, x, 0.0) for x in kept]
    count = sum((np.sign(x) == sign).astype(float) for x in kept)
    want = base + sum(agree) / np.where(count == 0, 1.0, count)
    np.testing.assert_allclose(got[name], want.astype(np.float32), rtol=1e-6, atol=1e-6)
    other = parse_config({"merge_method": "slerp", "base_model": "base", "models": [
        {"model": "ft0", "parameters": {"t": 0.2}}]}, root=tmp_path)  # fmt: skip
    with pytest.raises(UserError, match="applies to all models"):
        explain_merge(other)


# ---------------------------------------------------------------- run


def _naive_linear(models: list[dict[str, np.ndarray]], w: list[float]) -> dict[str, np.ndarray]:
    out = {}
    for name in models[0]:
        acc = np.zeros(models[0][name].shape, np.float64)
        for m, wi in zip(models, w, strict=True):
            acc += wi * m[name].astype(np.float64)
        out[name] = (acc / sum(w)).astype(np.float32)
    return out


def test_linear_merge_equals_naive_weighted_average(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "linear", "models": [
        {"model": "ft0", "parameters": {"weight": 0.2}},
        {"model": "ft1", "parameters": {"weight": 0.5}},
        {"model": "ft2", "parameters": {"weight": 0.3}}]}, root=tmp_path)  # fmt: skip
    report = run_merge(config, tmp_path / "out", workers=2)
    got = _read(tmp_path / "out")
    want = _naive_linear([m["ft0"], m["ft1"], m["ft2"]], [0.2, 0.5, 0.3])
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)
    assert report.tensors == len(SHAPES)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model_relation: merge" in card and "arxiv.org/abs/2203.05482" in card


def test_ties_merge_equals_registry_per_tensor(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "ties", "base_model": "base", "models": [
        {"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 0.4}} for i in range(3)],
        "seed": 3}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "out")
    got = _read(tmp_path / "out")
    ties = MERGE_METHODS.get("ties")
    for name in SHAPES:
        want = ties.merge([m[f"ft{i}"][name] for i in range(3)], m["base"][name], [1.0] * 3,
                          name=name, seed=3, density=0.4)  # fmt: skip
        np.testing.assert_array_equal(got[name], want.astype(np.float32))


def test_row_blocks_give_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _models(tmp_path)
    config = parse_config({"merge_method": "task_arithmetic", "base_model": "base",
                           "models": ["ft0", "ft1"], "parameters": {"lambda": 0.7}},
                          root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "whole")
    monkeypatch.setattr(mergerun, "BLOCK_ELEMENTS", 16)  # 2 rows of 8 per block
    run_merge(config, tmp_path / "blocks", workers=3, max_memory=4096)
    a = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "blocks" / "model.safetensors").read_bytes()


def test_ties_in_row_blocks_equals_whole_tensor_merge(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = _models(tmp_path)
    # many equal magnitudes at the cut: the first ones in flat order are kept, in blocks too
    m["base"]["lm_head.weight"][::2] = 1.0
    save_st(tmp_path / "base" / "model.safetensors", m["base"])
    for i in range(3):
        m[f"ft{i}"]["lm_head.weight"][::2] = 1.0 + 0.25 * (-1) ** i  # |τ| = 0.25 exactly
        save_st(tmp_path / f"ft{i}" / "model.safetensors", m[f"ft{i}"])
    config = parse_config({"merge_method": "ties", "base_model": "base", "models": [
        {"model": f"ft{i}", "parameters": {"weight": 0.5 + i, "density": 0.3}}
        for i in range(3)]}, root=tmp_path)  # fmt: skip
    monkeypatch.setattr(mergerun, "BLOCK_ELEMENTS", 24)  # 3 rows per block
    run_merge(config, tmp_path / "out", workers=2)
    got = _read(tmp_path / "out")
    ties = MERGE_METHODS.get("ties")
    for name in SHAPES:
        want = ties.merge([m[f"ft{i}"][name] for i in range(3)], m["base"][name],
                          [0.5, 1.5, 2.5], name=name, seed=0, density=0.3)  # fmt: skip
        np.testing.assert_array_equal(got[name], want.astype(np.float32))


def test_dare_is_reproducible_across_worker_counts(tmp_path: Path) -> None:
    _models(tmp_path)
    config = parse_config({"merge_method": "dare_ties", "base_model": "base", "seed": 11,
                           "models": [{"model": f"ft{i}", "parameters": {"density": 0.3}}
                                      for i in range(3)]}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "w1", workers=1)
    run_merge(config, tmp_path / "w4", workers=4)
    a = (tmp_path / "w1" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "w4" / "model.safetensors").read_bytes()
    other = parse_config({**{"merge_method": "dare_ties", "base_model": "base", "seed": 12},
                          "models": [{"model": f"ft{i}", "parameters": {"density": 0.3}}
                                     for i in range(3)]}, root=tmp_path)  # fmt: skip
    run_merge(other, tmp_path / "s12")
    assert a != (tmp_path / "s12" / "model.safetensors").read_bytes()


def test_sharded_output_with_index_and_bf16(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "linear", "models": ["ft0", "ft1"],
                           "dtype": "bfloat16"}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "out", max_shard_bytes=700)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(index["weight_map"]) == sorted(SHAPES)
    from safetensors.numpy import load_file  # the reference reader

    got: dict[str, np.ndarray] = {}
    for s in shards:
        got.update(load_file(str(tmp_path / "out" / s)))
    import ml_dtypes

    for name in SHAPES:
        a = m["ft0"][name].astype(ml_dtypes.bfloat16).astype(np.float64)
        b = m["ft1"][name].astype(ml_dtypes.bfloat16).astype(np.float64)
        want = ((a + b) / 2).astype(ml_dtypes.bfloat16)
        assert got[name].dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(got[name], want)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"


def test_slices_stack_layers_and_rename(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "ft0", "layer_range": [0, 2]}]},
        {"sources": [{"model": "ft1", "layer_range": [1, 3]}]}]}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "out")
    got = _read(tmp_path / "out")
    assert sorted(got) == sorted(
        [n for n in SHAPES if layer_index(n) is None]
        + [f"model.layers.{i}.{p}.weight" for i in range(4)
           for p in ("self_attn.q_proj", "mlp.up_proj")]
    )  # fmt: skip
    q = "self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[f"model.layers.1.{q}"], m["ft0"][f"model.layers.1.{q}"])
    np.testing.assert_array_equal(got[f"model.layers.2.{q}"], m["ft1"][f"model.layers.1.{q}"])
    np.testing.assert_array_equal(got[f"model.layers.3.{q}"], m["ft1"][f"model.layers.2.{q}"])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"],
                                  m["ft0"]["model.embed_tokens.weight"])  # fmt: skip
    np.testing.assert_array_equal(got["lm_head.weight"], m["ft1"]["lm_head.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_slerp_gradient_over_layers(tmp_path: Path) -> None:
    m = _models(tmp_path)
    config = parse_config({"merge_method": "slerp", "base_model": "base",
                           "models": ["base", "ft0"],
                           "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]},
                                                {"value": 0.3}]}}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "out")
    got = _read(tmp_path / "out")
    slerp = MERGE_METHODS.get("slerp")
    for name, t in [("model.layers.0.mlp.up_proj.weight", 0.0),
                    ("model.layers.1.mlp.up_proj.weight", 0.5),
                    ("model.layers.1.self_attn.q_proj.weight", 0.3)]:  # fmt: skip
        want = slerp.merge([m["base"][name], m["ft0"][name]], None, None, name=name, seed=0, t=t)
        np.testing.assert_array_equal(got[name], want.astype(np.float32))
    np.testing.assert_array_equal(got["model.layers.0.mlp.up_proj.weight"],
                                  m["base"]["model.layers.0.mlp.up_proj.weight"])  # fmt: skip


def test_failed_merge_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _models(tmp_path)
    config = parse_config({"merge_method": "linear", "models": ["ft0", "ft1"]}, root=tmp_path)
    calls = {"n": 0}
    real = mergerun._Runner._write

    def failing(self, job, out, row):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 4:
            raise UserError("boom")
        return real(self, job, out, row)

    monkeypatch.setattr(mergerun._Runner, "_write", failing)
    with pytest.raises(UserError, match="boom"):
        run_merge(config, tmp_path / "out", workers=1)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep")
    with pytest.raises(UserError, match="not empty"):
        run_merge(config, tmp_path / "taken")
    assert (tmp_path / "taken" / "x").read_text() == "keep"


# ---------------------------------------------------------------- inputs from git, CLI


def test_merge_revisions_of_a_tracked_file(repo: Path, git: Run) -> None:
    rng = np.random.default_rng(5)
    base = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    save_st(repo / "model.safetensors", base)
    git("git", "add", "model.safetensors")
    git("git", "commit", "-qm", "base")
    ft = {k: v + np.float32(0.5) for k, v in base.items()}
    save_st(repo / "model.safetensors", ft)
    git("git", "commit", "-qam", "ft")
    out = repo.parent / "merged"
    git("potluck", "merge", "--method", "task_arithmetic", "--base", "model.safetensors@HEAD~1",
        "model.safetensors@HEAD", "-p", "lambda=0.5", "-o", str(out))  # fmt: skip
    got = _read(out)
    for k, v in base.items():
        want = (v.astype(np.float64) + 0.5 * (ft[k].astype(np.float64) - v)).astype(np.float32)
        np.testing.assert_array_equal(got[k], want)
    card = (out / "README.md").read_text()
    head = git("git", "rev-parse", "HEAD").strip()
    assert f"commit={head}" in card


def test_cli_flag_form_explain_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _models(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(cli, ["merge", "--method", "ties", "--base", "base", "ft0", "ft1",
                                   "-p", "density=0.5", "--weights", "1,0.5", "--explain",
                                   "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["method"] == "ties" and len(data["tensors"]) == len(SHAPES)
    assert all(t["params"] == {"density": 0.5} and t["weights"] == [1.0, 0.5]
               for t in data["tensors"])  # fmt: skip
    bad = CliRunner().invoke(cli, ["merge", "--method", "tiess", "ft0", "-o", "x"])
    assert bad.exit_code == 2 and "ties" in bad.output


def test_plan_of_sources_directly(tmp_path: Path) -> None:
    _models(tmp_path)
    config = parse_config({"merge_method": "model_stock", "base_model": "base",
                           "models": ["ft0", "ft1"]}, root=tmp_path)  # fmt: skip
    with open_path(tmp_path / "base") as b, open_path(tmp_path / "ft0") as a, \
            open_path(tmp_path / "ft1") as c:  # fmt: skip
        refs = config.referenced_models()
        plan = plan_merge(config, dict(zip(refs, [b, a, c], strict=True)))
    assert {j.method for j in plan.jobs} == {"model_stock"}
    assert all(j.base is not None and len(j.models) == 2 for j in plan.jobs)


def test_regmean_from_stats_files_is_the_joint_least_squares_solution(tmp_path: Path) -> None:
    from potluck.ops.merge.statsfile import write_stats

    rng = np.random.default_rng(9)
    xs = [rng.standard_normal((50, 6)) for _ in range(2)]
    ws = [rng.standard_normal((4, 6)).astype(np.float32) for _ in range(2)]
    for i, (x, w) in enumerate(zip(xs, ws, strict=True)):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_st(d / "model.safetensors", {"proj.weight": w, "norm.weight": w[0].copy()})
        write_stats(d / "gram.safetensors", "gram", {"proj.weight": x.T @ x}, samples=50,
                    tokens=50)  # fmt: skip
    config = parse_config({"merge_method": "regmean", "parameters": {"alpha": 1.0},
                           "models": [{"model": f"m{i}", "stats": f"m{i}/gram.safetensors"}
                                      for i in range(2)]}, root=tmp_path)  # fmt: skip
    run_merge(config, tmp_path / "out")
    got = _read(tmp_path / "out")
    # W minimises Σᵢ ‖Xᵢ Wᵀ − Xᵢ Wᵢᵀ‖²: stack the problems and solve by least squares
    gram = [(x.T @ x).astype(np.float32).astype(np.float64) for x in xs]
    rhs = sum(g @ w.astype(np.float64).T for g, w in zip(gram, ws, strict=True))
    want = np.linalg.solve(sum(gram), rhs).T
    np.testing.assert_allclose(got["proj.weight"], want, rtol=1e-4, atol=1e-5)
    # no Gram for the norm: the plain average (the paper's rule for non-linear parameters)
    np.testing.assert_allclose(got["norm.weight"], (ws[0][0] + ws[1][0]) / 2, rtol=1e-6)
    no_stats = parse_config({"merge_method": "regmean", "models": ["m0", "m1"]}, root=tmp_path)
    with pytest.raises(UserError, match="needs gram statistics"):
        run_merge(no_stats, tmp_path / "out2")
