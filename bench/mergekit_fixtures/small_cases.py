"""The mergekit 0.1.5 methods (nuslerp, multislerp, karcher, sce, nearswap, arcee_fusion) merged by
mergekit on small models (``tests/fixtures/mergekit/small/``; ``python -m
bench.mergekit_fixtures --small``).

``models/{base,ft1,ft2,ft3}`` are made exactly like ``__main__``'s (the same four kinds of
fine-tune, exact float32 deltas) but Llama-shaped with hidden 8, 2 layers, 2 heads / 1 KV head,
intermediate 12 and vocabulary 16, so that each case's output is a few KB. Checked by
``tests/test_mergekit_methods.py`` (the runner and the registry, within 16 float32 ulps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common.llama import llama_config, llama_shapes

HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB = 8, 2, 2, 1, 12, 16
SHAPES = llama_shapes(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB)
CONFIG: dict[str, Any] = {
    **llama_config(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, VOCAB, max_positions=32),
    "torch_dtype": "float32",
}
M = "../models/"
W3 = [0.5, 0.3, 0.2]
FT = ["ft1", "ft2", "ft3"]


def _models(names: list[str], **per: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for i, name in enumerate(names):
        params = {k: v[i] for k, v in per.items()}
        rows.append({"model": M + name, "parameters": params} if params else {"model": M + name})
    return rows


CASES: dict[str, dict[str, Any]] = {
    "nuslerp": {
        "merge_method": "nuslerp",
        "models": _models(["ft1", "ft2"], weight=[0.7, 0.3]),
        "dtype": "float32",
    },
    "nuslerp_rows": {
        "merge_method": "nuslerp",
        "models": _models(["ft1", "ft3"], weight=[0.5, 0.5]),
        "parameters": {"nuslerp_flatten": False},
        "dtype": "float32",
    },
    "nuslerp_base_columns": {
        "merge_method": "nuslerp",
        "base_model": M + "base",
        "models": _models(["ft1", "ft2"], weight=[0.4, 0.6]),
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "dtype": "float32",
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": _models(FT, weight=W3),
        "dtype": "float32",
    },
    "multislerp_base": {
        "merge_method": "multislerp",
        "base_model": M + "base",
        "models": _models(FT, weight=[1.0, 2.0, 1.0]),
        "dtype": "float32",
    },
    "karcher": {
        "merge_method": "karcher",
        "models": _models(FT),
        "dtype": "float32",
    },
    "karcher_base": {
        "merge_method": "karcher",
        "base_model": M + "base",
        "models": _models(["ft1", "ft2"]),
        "parameters": {"max_iter": 20, "tol": 1e-6},
        "dtype": "float32",
    },
    "sce": {
        "merge_method": "sce",
        "base_model": M + "base",
        "models": _models(FT),
        "dtype": "float32",
    },
    "sce_topk": {
        "merge_method": "sce",
        "base_model": M + "base",
        "models": _models(FT),
        "parameters": {"select_topk": 0.3},
        "dtype": "float32",
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": M + "base",
        "models": _models(["ft1"]),
        "parameters": {"t": 0.005},
        "dtype": "float32",
    },
    # mergekit's float32 rounding can flip mask decisions at the cut (see test_mergekit_methods)
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": M + "base",
        "models": _models(["ft1"]),
        "dtype": "float32",
    },
}


def build(root: Path, run_mergekit: Any, only: list[str] | None) -> None:
    """Models, then every case (or those in ``only``) under ``root`` (``…/small``)."""
    import yaml

    from bench.mergekit_fixtures.__main__ import make_models, write_model

    for key, tensors in make_models(seed=2025, shapes=SHAPES).items():
        write_model(root / "models" / key, tensors, CONFIG)
    for name in only or list(CASES):
        case_dir = root / name
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "config.yaml").write_text(yaml.safe_dump(CASES[name], sort_keys=False))
        run_mergekit(case_dir)
