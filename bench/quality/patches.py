"""Each fine-tune shipped as lossy patches: accuracy kept vs patch size vs the fp16 delta (fixed
codecs, then ``--budget`` at 1/8 … 1/64 of the fp16 delta)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .stages import log

Rule = tuple[str, str, Mapping[str, object]]
#: (label, default codec, params, rules): exact tensors where the delta is tiny or sparse.
EXACT_SMALL: list[Rule] = [
    ("*LayerNorm*", "exact_xor", {}),
    ("*.bias", "exact_xor", {}),
    ("*embeddings*", "exact_sparse", {}),
]
CODECS: list[tuple[str, str, dict[str, object], list[Rule]]] = [
    ("exact_xor (lossless)", "exact_xor", {}, []),
    ("quant int8", "quant", {"bits": 8}, []),
    ("quant int4", "quant", {"bits": 4}, []),
    ("ternary d=0.1", "ternary", {"density": 0.1}, []),
    ("lowrank r=8", "lowrank", {"rank": 8}, []),
    ("exact norms/bias/emb + lowrank r=8", "lowrank", {"rank": 8}, EXACT_SMALL),
    (
        "lowrank r=12 F16, embeddings rows=changed",
        "lowrank",
        {"rank": 12, "factors": "F16"},
        [
            ("*LayerNorm*", "exact_xor", {}),
            ("*.bias", "exact_xor", {}),
            ("*embeddings*", "lowrank", {"rank": 12, "factors": "F16", "rows": "changed"}),
        ],
    ),
]


#: ``patch create --budget`` settings measured after the fixed codecs (issue 20's curves).
BUDGETS = ("x8", "x16", "x32", "x64")


def fp16_delta_bytes(base: Path, target: Path) -> int:
    """2 bytes × the number of parameters whose bits changed (the reference size)."""
    from safetensors.numpy import load_file

    b, t = load_file(str(base)), load_file(str(target))
    n = 0
    for name, x in b.items():
        y = t[name]
        n += int(
            np.sum(
                x.view(np.uint8).reshape(x.size, -1) != y.view(np.uint8).reshape(y.size, -1), axis=1
            )
            .astype(bool)
            .sum()
        )
    return 2 * n


def patch_rows(
    base: Path, target: Path, work: Path, score: Callable[[Path], float], seed: int
) -> list[dict[str, Any]]:
    """For each codec: patch bytes, ratio to the fp16 delta, test accuracy of the patched model."""
    from potluck.ops.patch.apply import apply_patch
    from potluck.ops.patch.create import create_patch

    work.mkdir(parents=True, exist_ok=True)
    ref = fp16_delta_bytes(base, target)
    rows = []
    settings: list[tuple[str, dict[str, Any]]] = [
        (label, {"rules": rules, "default_codec": codec, "params": params})
        for label, codec, params, rules in CODECS
    ]
    settings += [(f"budget {b}", {"budget": b}) for b in BUDGETS]
    for label, kw in settings:
        t0 = time.perf_counter()
        patch, out = work / "p.potluck", work / "patched.safetensors"
        info = create_patch(base, target, patch, seed=seed, **kw)
        apply_patch(base, patch, out)
        acc = score(out)
        rows.append({"codec": label, "bytes": info.size, "fp16_delta_bytes": ref,
                     "ratio_vs_fp16": ref / info.size, "test_acc": acc})  # fmt: skip
        log(f"    {label}: {info.size / 1e6:.2f} MB ({ref / info.size:.1f}x smaller than fp16 "
            f"delta) acc {acc:.4f}  {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return rows
