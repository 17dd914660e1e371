"""Build the mergekit equivalence fixtures under ``tests/fixtures/mergekit/`` (mergekit: reference).

Run with the mergekit venv (see ``bench/requirements-mergekit.txt``), from the repository root::

    python3 -m venv /work/venvs/mergekit
    /work/venvs/mergekit/bin/pip install torch==2.13.0          # the CPU wheel, first
    /work/venvs/mergekit/bin/pip install -r bench/requirements-mergekit.txt
    /work/venvs/mergekit/bin/python -m bench.mergekit_fixtures  # [--only CASE ...]
    /work/venvs/mergekit/bin/python -m bench.mergekit_fixtures --tokenizer  # tokenizer/ cases

What it writes (everything is regenerated; ~2.5 MB in all):

* ``models/{base,ft1,ft2,ft3}/``: tiny Llama-shaped Hugging Face directories (``config.json`` of a
  ``LlamaConfig``: hidden 32, 3 layers, 4 heads / 2 KV heads, intermediate 48, vocab 64, untied
  ``lm_head``; ``model.safetensors`` in float32). ``base`` is N(0, 0.02) (RMSNorm gains
  1 + N(0, 0.02)); ``ft1`` = base + a dense N(0, 0.01) delta δ₁; ``ft2`` = base +
  (−0.6·δ₁ + N(0, 0.01)) on a random half of the entries (sign conflicts with ft1), zero
  elsewhere; ``ft3`` = base + a 10 %-sparse N(0, 0.02) delta. Every fine-tune is made so that
  ``ft − base`` is *exact* in float32: mergekit subtracts in float32, potluck in float64, and this
  way both see the very same task vectors (so magnitude ranks, top-k cuts and sign elections
  cannot differ by a rounding). For that every value lies on a grid of 2⁻²⁸ and the deltas are
  clipped to ±0.06 (see ``GRID``).
* ``<case>/config.yaml``: the mergekit YAML, model paths relative to the case directory
  (``../models/ft1``); mergekit is run with the case directory as its working directory.
* ``<case>/mergekit.safetensors``: every tensor mergekit wrote (all shards joined, dtypes kept) and
  ``<case>/mergekit-config.json``: the ``config.json`` mergekit wrote.
* ``README.md``: the mergekit / torch versions and the case list.

mergekit runs on the CPU as ``mergekit-yaml config.yaml OUT --no-copy-tokenizer --lazy-unpickle
--random-seed 0 --num-threads 1 --quiet`` with ``OMP_NUM_THREADS=1``: one thread, and a fixed
seed, so that even the random methods (DARE, DELLA: ``torch.bernoulli`` on the global generator)
are reproducible run to run. potluck uses its own keyed RNG, so for those methods only density 1
is compared value by value; for density < 1 the fixtures are single-model merges whose statistics
(kept fraction, L1 rescale factor, magnitude bias) the tests check.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.llama import llama_config, llama_shapes
from bench.common.paths import REPO_ROOT

FIXTURES = REPO_ROOT / "tests" / "fixtures" / "mergekit"
DEFAULT_MERGEKIT = Path(sys.executable).parent / "mergekit-yaml"

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 32, 3, 4, 2, 48, 64

LLAMA_CONFIG: dict[str, Any] = {
    **llama_config(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB, max_positions=128),
    "torch_dtype": "float32",
}


#: Every weight is a multiple of this (2⁻²⁸): then a difference below 2⁻⁴ in magnitude is exact in
#: float32 (24 bits), so ``ft − base`` is the same in mergekit's float32 and potluck's float64.
GRID = 2.0**-28
MAX_DELTA = 0.06


def on_grid(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to a multiple of ``GRID``, as float32 (still a multiple: ulp ≥ GRID there)."""
    return (np.round(x / GRID) * GRID).astype(np.float32)


def make_base(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """N(0, 0.02) weights, 1 + N(0, 0.02) norm gains, float32, on the grid."""
    out = {}
    for name, shape in shapes.items():
        x = rng.normal(0.0, 0.02, size=shape)
        out[name] = on_grid(x + 1.0 if len(shape) == 1 else x)
    return out


def exact_finetune(base: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """float32 ``base + delta`` on the grid, so that ``ft − base`` is exact in float32."""
    ft = on_grid(base.astype(np.float64) + np.clip(delta, -MAX_DELTA, MAX_DELTA))
    exact = ft.astype(np.float64) - base.astype(np.float64)
    if not np.array_equal((ft - base).astype(np.float64), exact):
        raise RuntimeError("a float32 delta is not exact")
    return ft


def make_models(
    seed: int = 2024, shapes: dict[str, tuple[int, ...]] | None = None
) -> dict[str, dict[str, Any]]:
    """base, ft1 (dense), ft2 (half, sign conflicts with ft1), ft3 (10 % sparse)."""
    rng = np.random.default_rng(seed)
    shapes = shapes or llama_shapes(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB)
    base = make_base(rng, shapes)
    fts: dict[str, dict[str, Any]] = {"ft1": {}, "ft2": {}, "ft3": {}}
    for name, b in base.items():
        d1 = rng.normal(0.0, 0.01, size=b.shape)
        d2 = np.where(rng.random(b.shape) < 0.5, -0.6 * d1 + rng.normal(0.0, 0.01, b.shape), 0.0)
        d3 = np.where(rng.random(b.shape) < 0.1, rng.normal(0.0, 0.02, b.shape), 0.0)
        for key, d in (("ft1", d1), ("ft2", d2), ("ft3", d3)):
            fts[key][name] = exact_finetune(b, d)
    return {"base": base, **fts}


def write_model(path: Path, tensors: dict[str, Any], config: dict[str, Any]) -> None:
    """A Hugging Face directory: config.json + model.safetensors."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


# ── the cases: name → YAML (as a dict; paths relative to the case directory) ─────────────────

M = "../models/"
W3 = [0.5, 0.3, 0.2]


def _models(names: list[str], **per: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(names):
        params = {k: v[i] for k, v in per.items()}
        rows.append({"model": M + name, "parameters": params} if params else {"model": M + name})
    return rows


FT = ["ft1", "ft2", "ft3"]

CASES: dict[str, dict[str, Any]] = {
    "linear": {
        "merge_method": "linear",
        "models": _models(FT, weight=W3),
        "dtype": "float32",
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": _models(FT, weight=[0.6, 0.3, 0.3]),
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": M + "base",
        "models": _models(FT, weight=[0.7, 0.5, -0.3]),
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": M + "base",
        "models": _models(FT, weight=[1.0, 0.8, 0.6], density=[0.3, 0.5, 0.7]),
        "dtype": "float32",
    },
    "ties_unnormalized": {
        "merge_method": "ties",
        "base_model": M + "base",
        "models": _models(FT, weight=[0.5, 0.5, 0.5], density=[0.2, 0.2, 0.2]),
        "parameters": {"normalize": False, "lambda": 0.6},
        "dtype": "float32",
    },
    "dare_ties_density1": {
        "merge_method": "dare_ties",
        "base_model": M + "base",
        "models": _models(FT, weight=[1.0, 0.7, 0.4], density=[1.0, 1.0, 1.0]),
        "dtype": "float32",
    },
    "dare_linear_stats": {
        "merge_method": "dare_linear",
        "base_model": M + "base",
        "models": _models(["ft1"], weight=[1.0], density=[0.3]),
        "dtype": "float32",
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": M + "base",
        "models": _models(FT, weight=[0.6, 0.4, 0.5], density=[0.8, 0.8, 0.8]),
        "parameters": {"gamma": 0.05},
        "dtype": "float32",
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": M + "base",
        "models": _models(FT, weight=[1.0, 1.0, 1.0], density=[0.7, 0.7, 0.7], gamma=[0.1] * 3),
        "dtype": "float32",
    },
    "della_density1": {
        "merge_method": "della",
        "base_model": M + "base",
        "models": _models(FT, weight=[0.9, 0.6, 0.3], density=[1.0, 1.0, 1.0]),
        "dtype": "float32",
    },
    "della_linear_stats": {
        "merge_method": "della_linear",
        "base_model": M + "base",
        "models": _models(["ft1"], weight=[1.0], density=[0.4], epsilon=[0.2]),
        "dtype": "float32",
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": M + "base",
        "models": _models(["base", "ft1"]),
        "parameters": {"t": 0.3},
        "dtype": "float32",
    },
    "slerp_gradient": {
        "merge_method": "slerp",
        "base_model": M + "ft1",
        "models": _models(["ft1", "ft2"]),
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                {"value": 0.4},
            ]
        },
        "dtype": "float32",
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": M + "base",
        "models": _models(FT),
        "dtype": "float32",
    },
    "model_stock_filterwise": {
        "merge_method": "model_stock",
        "base_model": M + "base",
        "models": _models(FT),
        "parameters": {"filter_wise": True},
        "dtype": "float32",
    },
    "passthrough_slices": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": M + "base", "layer_range": [0, 2]}]},
            {"sources": [{"model": M + "ft2", "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    },
    "linear_float16": {
        "merge_method": "linear",
        "models": _models(FT, weight=W3),
        "dtype": "float16",
    },
    "slerp_bfloat16": {
        "merge_method": "slerp",
        "base_model": M + "base",
        "models": _models(["base", "ft2"]),
        "parameters": {"t": 0.6},
        "dtype": "bfloat16",
    },
}


def run_mergekit(mergekit_yaml: Path, case_dir: Path) -> None:
    """mergekit-yaml on ``case_dir/config.yaml`` (cwd = case_dir); keep its tensors and config."""
    import torch
    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [
            str(mergekit_yaml), "config.yaml", str(out), "--no-copy-tokenizer", "--lazy-unpickle",
            "--random-seed", "0", "--num-threads", "1", "--quiet",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        subprocess.run(cmd, cwd=case_dir, env=env, check=True)
        tensors: dict[str, torch.Tensor] = {}
        for shard in sorted(out.glob("*.safetensors")):
            tensors.update(load_file(str(shard)))
        save_file(tensors, str(case_dir / "mergekit.safetensors"), metadata={"format": "pt"})
        shutil.copy(out / "config.json", case_dir / "mergekit-config.json")
        if (out / "tokenizer.json").is_file():  # tokenizer_source cases
            shutil.copy(out / "tokenizer.json", case_dir / "mergekit-tokenizer.json")


def write_readme(cases: list[str]) -> None:
    """Versions of the reference tool and the case list."""
    from importlib.metadata import version

    lines = [
        "# mergekit equivalence fixtures",
        "",
        "Made by `python -m bench.mergekit_fixtures` (see its docstring) with "
        f"mergekit {version('mergekit')}, torch {version('torch')}, "
        f"transformers {version('transformers')}, safetensors {version('safetensors')} "
        f"(Python {sys.version.split()[0]}, CPU, 1 thread, `--random-seed 0`).",
        "Checked by `tests/test_mergekit_equiv.py`. Do not edit by hand: regenerate.",
        "",
        "`models/`: base, ft1 (dense delta), ft2 (half the entries, sign conflicts with ft1),",
        "ft3 (10 % sparse); Llama-shaped, hidden 32, 3 layers, float32.",
        "",
        "`tokenizer/` (`--tokenizer`, see `tokenizer_cases.py`): models with different",
        "vocabularies merged with tokenizer_source union / base / a model / pad_to_multiple_of;",
        "checked by `tests/test_mergekit_tokenizer.py`. `small/` (`--small`, see",
        "`small_cases.py`): the mergekit 0.1.5 methods (nuslerp … arcee_fusion) on smaller",
        "models of the same kind; checked by `tests/test_mergekit_methods.py`.",
        "",
        "| case | merge_method | dtype |",
        "| --- | --- | --- |",
    ]
    for name in cases:
        c = CASES[name]
        lines.append(f"| `{name}` | {c['merge_method']} | {c.get('dtype', '-')} |")
    (FIXTURES / "README.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Regenerate the models, then every case (or ``--only`` some)."""
    import yaml

    ap = argparse.ArgumentParser(
        prog="python -m bench.mergekit_fixtures", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--only", nargs="*", default=None, help="case names (default: all)")
    ap.add_argument("--mergekit-yaml", type=Path, default=DEFAULT_MERGEKIT)
    ap.add_argument("--tokenizer", nargs="*", default=None, help="tokenizer cases only")
    ap.add_argument("--small", nargs="*", default=None, help="small/ (mergekit 0.1.5 methods)")
    args = ap.parse_args()
    if args.small is not None:
        from bench.mergekit_fixtures import small_cases

        run = lambda case_dir: run_mergekit(args.mergekit_yaml, case_dir)  # noqa: E731
        small_cases.build(FIXTURES / "small", run, args.small or None)
        return
    if args.tokenizer is not None:
        from bench.mergekit_fixtures import tokenizer_cases

        run = lambda case_dir: run_mergekit(args.mergekit_yaml, case_dir)  # noqa: E731
        tokenizer_cases.build(FIXTURES / "tokenizer", run, args.tokenizer or None)
        return
    models = make_models()
    for key, tensors in models.items():
        write_model(FIXTURES / "models" / key, tensors, LLAMA_CONFIG)
    names = args.only or list(CASES)
    for name in names:
        case_dir = FIXTURES / name
        case_dir.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(CASES[name], sort_keys=False)
        (case_dir / "config.yaml").write_text(text)
        print(f"mergekit: {name}", file=sys.stderr)
        run_mergekit(args.mergekit_yaml, case_dir)
    write_readme(list(CASES))


if __name__ == "__main__":
    main()
