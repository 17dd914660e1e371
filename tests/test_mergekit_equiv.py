"""potluck's merges against mergekit's outputs (``tests/fixtures/mergekit/``: the reference tool).

The fixtures (made by ``python -m bench.mergekit_fixtures`` with mergekit 0.1.5, see their
README) are tiny Llama-shaped models (a base and three fine-tunes whose task vectors are exact
in float32, so mergekit's float32 and potluck's float64 see the same deltas, ranks and signs),
one mergekit YAML per case and every tensor mergekit wrote for it.

Two groups of tests:

* ``test_run_merge_matches_mergekit``: the whole runner, ``potluck.ops.merge.run.run_merge`` on
  the same YAML (model paths rewritten to absolute ones in a temporary copy), every output tensor
  against mergekit's (see ``run_potluck``: the one place that calls the runner).
* ``test_registry_matches_mergekit``: ``potluck.merging.MERGE_METHODS`` called directly, tensor by
  tensor, with the YAML's parameters translated the way mergekit reads them
  (``registry_merge``), so the methods' mergekit compatibility is checked independently of the
  runner.

Tolerances. float32 outputs: |potluck − mergekit| ≤ 16·ε₃₂·S per tensor, ε₃₂ = 2⁻²³ and S the
largest magnitude among the tensor's inputs and mergekit's output. mergekit computes in float32
(a handful of roundings of intermediates bounded by ~S each: the task vector sum, the division by
the weights, base + Δ; SLERP's two products), potluck in float64 with one final rounding, so the
gap is a few float32 ulps of S; 16 leaves room without hiding any real difference (a wrong entry
is off by ~1e-3, a wrong rescale by a factor). float16/bfloat16 outputs: at most one ulp of the
target dtype apart (both tools round nearly the same float32/float64 value to it).

DARE and DELLA draw random masks (mergekit: ``torch.bernoulli`` on the global generator; potluck:
its keyed counter-based generator), so values agree only at density 1 (``*_density1``). The
``*_stats`` cases (one fine-tune, density < 1) are checked by statistics instead: the kept
fraction is within 5σ of the expected one, the kept entries are all scaled by the one factor
‖τ‖₁ / ‖kept τ‖₁ (mergekit's ``rescale: true``), and (DELLA) larger magnitudes are kept more often.
"""

from __future__ import annotations

import json
import math
from functools import cache
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import yaml

from potluck.merging import MERGE_METHODS

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "mergekit"
MODELS = FIXTURES / "models"
CASES = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.yaml").is_file())
EPS32 = 2.0**-23
TOL_ULPS = 16

#: cases checked by statistics (random masks): name → (expected keep fraction, magnitude-biased)
STATS_CASES = {"dare_linear_stats": (0.3, False), "della_linear_stats": (0.4, True)}

#: cases the registry can express by itself (no slices, gradients or filters); the others are for
#: the runner only.
REGISTRY_CASES = [
    "linear",
    "linear_unnormalized",
    "task_arithmetic",
    "ties",
    "ties_unnormalized",
    "dare_ties_density1",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della_density1",
    "slerp",
    "model_stock",
    "model_stock_filterwise",
    "linear_float16",
    "slerp_bfloat16",
]

_ST_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
}
_NP_DTYPES: dict[str, Any] = {
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
}
#: mergekit's default ``rescale`` per method (a bool there; True means "match the L1 norm").
_MERGEKIT_RESCALE = {"dare_ties", "dare_linear", "della", "della_linear"}


# ── reading (a minimal safetensors reader, independent of potluck's) ──────────────────────────


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of one file: 8-byte little-endian header length, JSON header, raw data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = raw[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(data, dtype=_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


def read_dir(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face directory (all shards)."""
    out: dict[str, np.ndarray] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update(read_safetensors(shard))
    return out


@cache
def model(name: str) -> dict[str, np.ndarray]:
    """One input model of the fixtures (base, ft1, ft2, ft3)."""
    return read_dir(MODELS / name)


@cache
def expected(case: str) -> dict[str, np.ndarray]:
    """mergekit's output for ``case``."""
    return read_safetensors(FIXTURES / case / "mergekit.safetensors")


def case_config(case: str) -> dict[str, Any]:
    """The case's YAML as a mapping."""
    data = yaml.safe_load((FIXTURES / case / "config.yaml").read_text())
    assert isinstance(data, dict)
    return data


def model_key(ref: str) -> str:
    """``../models/ft1`` → ``ft1``."""
    return Path(ref).name


# ── comparing ──────────────────────────────────────────────────────────────────────────────────


def ulp_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in units in the last place between two 16-bit float arrays of one dtype."""

    def ordered(x: np.ndarray) -> np.ndarray:
        bits = x.view(np.uint16).astype(np.int64)
        mag = bits & 0x7FFF
        return np.where(bits & 0x8000, -mag, mag)

    return np.asarray(np.abs(ordered(a) - ordered(b)))


def assert_close(got: np.ndarray, want: np.ndarray, scale: float, what: str) -> None:
    """Same shape and dtype; float32: within TOL_ULPS·ε₃₂·scale; 16-bit: within one ulp."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != mergekit's {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != mergekit's {want.dtype}"
    if want.dtype.itemsize == 2:
        worst = int(ulp_distance(got, want).max(initial=0))
        assert worst <= 1, f"{what}: {worst} ulps of {want.dtype} from mergekit's"
        return
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0))
    tol = TOL_ULPS * EPS32 * scale
    assert diff <= tol, f"{what}: max |Δ| {diff:.3g} > {tol:.3g} ({diff / (EPS32 * scale):.1f} ulp)"


def input_scale(case: str, tensor: str, want: np.ndarray) -> float:
    """Largest magnitude among the case's inputs for ``tensor`` and mergekit's output."""
    scale = float(np.abs(want.astype(np.float64)).max(initial=0))
    for key in ("base", "ft1", "ft2", "ft3"):
        if tensor in model(key):
            scale = max(scale, float(np.abs(model(key)[tensor]).max()))
    return scale


# ── statistics for the random methods ────────────────────────────────────────────────────────


def check_random_drop(out: dict[str, np.ndarray], density: float, biased: bool, who: str) -> None:
    """``out`` = base + rescaled random subset of τ = ft1 − base (see the module docstring)."""
    kept_total = nonzero_total = 0
    top_kept = top_n = low_kept = low_n = 0
    for name, merged in out.items():
        base = model("base")[name].astype(np.float64)
        tau = model("ft1")[name].astype(np.float64) - base
        delta = merged.astype(np.float64) - base
        kept = (delta != 0) & (tau != 0)
        assert not np.any((delta != 0) & (tau == 0)), f"{who} {name}: changed an entry τ = 0"
        if kept.any():
            factor = np.abs(tau).sum() / np.abs(tau[kept]).sum()
            atol = TOL_ULPS * EPS32 * float(np.abs(merged).max())  # merged is rounded to float32
            np.testing.assert_allclose(
                delta[kept], factor * tau[kept], rtol=0, atol=atol, err_msg=f"{who} {name}: rescale"
            )
        kept_total += int(kept.sum())
        nonzero_total += int((tau != 0).sum())
        if biased and tau.ndim == 2:  # DELLA ranks per row: compare each row's halves
            order = np.argsort(np.abs(tau), axis=1)
            half = tau.shape[1] // 2
            low_idx, top_idx = order[:, :half], order[:, -half:]
            low_kept += int(np.take_along_axis(kept, low_idx, axis=1).sum())
            top_kept += int(np.take_along_axis(kept, top_idx, axis=1).sum())
            low_n += low_idx.size
            top_n += top_idx.size
    frac = kept_total / nonzero_total
    sigma = math.sqrt(density * (1 - density) / nonzero_total)
    assert abs(frac - density) <= 5 * sigma, f"{who}: kept {frac:.4f}, expected {density}"
    if biased:
        assert top_kept / top_n - low_kept / low_n > 0.1, f"{who}: no bias towards large |τ|"


# ── 1. the whole runner ──────────────────────────────────────────────────────────────────────


def run_potluck(config_path: Path, out_dir: Path) -> None:
    """potluck's merge of ``config_path`` into ``out_dir``: the one place that calls the runner."""
    from potluck.ops.merge.config import load_config
    from potluck.ops.merge.run import run_merge

    run_merge(load_config(config_path), out_dir)


def localized_config(case: str, tmp_path: Path) -> Path:
    """A copy of the case's YAML whose model paths are absolute."""
    text = (FIXTURES / case / "config.yaml").read_text()
    path = tmp_path / f"{case}.yaml"
    path.write_text(text.replace("../models/", f"{MODELS.as_posix()}/"))
    return path


@pytest.mark.parametrize("case", CASES)
def test_run_merge_matches_mergekit(case: str, tmp_path: Path) -> None:
    """Same tensor names, shapes, dtypes and values (within tolerance) as mergekit's output."""
    out_dir = tmp_path / "out"
    run_potluck(localized_config(case, tmp_path), out_dir)
    got, want = read_dir(out_dir), expected(case)
    assert sorted(got) == sorted(want)
    want_cfg = json.loads((FIXTURES / case / "mergekit-config.json").read_text())
    got_cfg = json.loads((out_dir / "config.json").read_text())
    assert got_cfg["num_hidden_layers"] == want_cfg["num_hidden_layers"]
    if case in STATS_CASES:
        for name in want:
            assert (got[name].shape, got[name].dtype) == (want[name].shape, want[name].dtype)
        check_random_drop(got, *STATS_CASES[case], who=f"potluck {case}")
        return
    for name in sorted(want):
        assert_close(got[name], want[name], input_scale(case, name, want[name]), f"{case} {name}")


# ── 2. the registry, tensor by tensor ────────────────────────────────────────────────────────


def _param(key: str, value: Any) -> tuple[str, Any]:
    """mergekit's name and value → the registry's."""
    if key == "lambda":
        return "lambda_", value
    if key == "rescale":
        return "rescale", "l1" if value else "none"
    return key, value


def registry_params(
    cfg: dict[str, Any], entries: list[dict[str, Any]], per_model: tuple[str, ...]
) -> dict[str, Any]:
    """Top-level and per-model parameters, mergekit's defaults made explicit.

    A per-model parameter (mergekit's ``density``, ``gamma``, ``epsilon``) becomes one value when
    all models agree, else a tuple with one value per model (keys in ``MergeMethod.per_model``).
    """
    params: dict[str, Any] = {}
    if cfg["merge_method"] in _MERGEKIT_RESCALE:
        params["rescale"] = "l1"
    for key, value in (cfg.get("parameters") or {}).items():
        params.update([_param(key, value)])
    for key in ("density", "gamma", "epsilon"):
        values = [(e.get("parameters") or {}).get(key) for e in entries]
        if all(v is None for v in values):
            continue
        if len(set(values)) == 1:
            params[key] = values[0]
        else:
            assert key in per_model and None not in values, f"{key}: {values}"
            params[key] = tuple(float(v) for v in values if v is not None)
    return params


def registry_merge(cfg: dict[str, Any], tensor: str) -> np.ndarray:
    """One tensor merged by ``MERGE_METHODS`` the way mergekit reads ``cfg`` (``models:`` form).

    Inputs are cast to ``dtype`` first (mergekit's ``dtype`` is the dtype the inputs are loaded
    in); the float64 result is rounded to it. SLERP: the base is t = 0, the other model t = 1.
    """
    dtype = _NP_DTYPES[cfg.get("dtype", "float32")]
    method = MERGE_METHODS.get(cfg["merge_method"])

    def load(ref: str) -> np.ndarray:
        return model(model_key(ref))[tensor].astype(dtype)

    base_ref = cfg.get("base_model")
    entries = [e for e in cfg["models"] if e["model"] != base_ref]
    params = registry_params(cfg, entries, method.per_model)
    weights = None
    if method.uses_weights and any("weight" in (e.get("parameters") or {}) for e in entries):
        weights = [float(e["parameters"]["weight"]) for e in entries]
    tensors = [load(e["model"]) for e in entries]
    base = load(base_ref) if base_ref else None
    if cfg["merge_method"] == "slerp":
        assert base is not None
        tensors, base = [base, tensors[0]], None
    elif not method.needs_base:
        base = None
    merged = method.merge(tensors, base, weights, name=tensor, seed=0, **params)
    return np.asarray(merged).astype(dtype)


@pytest.mark.parametrize("case", REGISTRY_CASES)
def test_registry_matches_mergekit(case: str) -> None:
    """Every tensor of the case, merged by the registry, within tolerance of mergekit's."""
    cfg, want = case_config(case), expected(case)
    assert sorted(want) == sorted(model("base"))
    for name in sorted(want):
        got = registry_merge(cfg, name)
        assert_close(got, want[name], input_scale(case, name, want[name]), f"{case} {name}")


@pytest.mark.parametrize("case", sorted(STATS_CASES))
def test_registry_random_drop_statistics(case: str) -> None:
    """DARE/DELLA at density < 1: mergekit's output and the registry's obey the same statistics."""
    cfg = case_config(case)
    density, biased = STATS_CASES[case]
    check_random_drop(expected(case), density, biased, who=f"mergekit {case}")
    ours = {name: registry_merge(cfg, name) for name in expected(case)}
    check_random_drop(ours, density, biased, who=f"registry {case}")


def test_fixture_models_have_exact_float32_deltas() -> None:
    """The premise of the tight tolerances: ft − base is the same in float32 and float64."""
    for key in ("ft1", "ft2", "ft3"):
        for name, base in model("base").items():
            ft = model(key)[name]
            exact = ft.astype(np.float64) - base.astype(np.float64)
            assert np.array_equal((ft - base).astype(np.float64), exact), f"{key} {name}"
