"""Gain kept vs patch bytes on the real MiniLM fine-tunes of bench.quality (cached, read-only).

For every cached fine-tune in ``bench/results/quality/finetunes`` (``--seeds``; the fine-tunes
are never trained here) and every setting — today's fixed recipe (``lowrank`` r=12, float16
factors, embeddings over changed rows, norms/biases exact) and ``--budget`` at x8, x16, x32,
x64 of the fp16 delta, optionally weighted by the contributor's input Gram matrices (``gram``:
``potluck stats gram --embeddings`` on its first ``--gram-n`` training texts, the statistics
``--gram`` takes) — the patch is created, applied, and the patched encoder scored on the task's
test split with the fine-tune's own head:

* ``acc``: test accuracy; ``gain kept`` = (acc − probe) / (fine-tune − probe), the probe being
  the linear probe on the base encoder (``probes-s<seed>.json``); only where the fine-tune
  beats the probe by ``report.MIN_GAIN`` (else ``n/a``);
* ``agree``: fraction of test predictions equal to the fine-tune's;
* ``shift kept``: 1 − ‖E_patch − E_ft‖_F / ‖E_ft − E_base‖_F over the test embeddings (how much
  of the fine-tune's change of the model's outputs the patch reproduces; 1 = all of it).

    .venv/bin/python -m bench.patch.curves [--tasks ...] [--seeds 0,1,2] [--budgets x16,x32]
        [--gram] [--sign] [--json PATH]
"""

from __future__ import annotations

from bench.common.env import cpu_threads, offline

cpu_threads(1)  # one thread: the machine is shared
offline()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import data, finetune, model  # noqa: E402
from bench.patch.budget import fixed_rules  # noqa: E402
from bench.quality import report, stages  # noqa: E402
from bench.quality.patches import fp16_delta_bytes  # noqa: E402
from potluck.codecs.rules import Rule  # noqa: E402
from potluck.ops.patch.tune_scales import TuneSettings  # noqa: E402

FINETUNES = stages.RESULTS / "finetunes"


def cached_runs(
    tasks: list[str], seeds: list[int], recipe: str = "base"
) -> list[tuple[str, int, int, Path]]:
    """(task, seed, steps, folder) of each cached full fine-tune (no LoRA) of ``tasks`` made
    with ``recipe`` (``base``, or ``lpft``: the head started from the probe)."""
    out = []
    head_init = "probe" if recipe == "lpft" else ""
    for meta_p in sorted(FINETUNES.glob("*/meta.json")):
        cfg = json.loads(meta_p.read_text())["config"]
        if cfg.get("head_init", "") != head_init:
            continue
        if cfg["task"] in tasks and cfg["seed"] in seeds and not cfg.get("lora_rank"):
            out.append((cfg["task"], cfg["seed"], cfg["steps"], meta_p.parent))
    return out


def sign_rules(codec: str, params: dict[str, Any]) -> list[Rule]:
    """``codec`` (a sign codec) on every matrix but the word embedding, which keeps the fixed
    recipe's low rank over its changed rows (a sparse-row delta: 1 bit an entry would spend
    most of the patch on unchanged rows); norms and biases exact."""
    fixed = fixed_rules(12)
    return [*fixed[:3], ("*", codec, params)]


def settings(
    budgets: list[str], gram: Path | None, tune: TuneSettings | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(label, create_patch keywords) of each setting measured; with ``tune`` also BitDelta
    and ComPEFT (``sign_rules``), with the weight-space scales and with the scales tuned on
    the fine-tune's outputs (``ops.patch.tune_scales``)."""
    rows: list[tuple[str, dict[str, Any]]] = [
        ("lowrank r=12 F16 (fixed)", {"rules": fixed_rules(12)})
    ]
    rows += [(f"budget {b}", {"budget": b}) for b in budgets]
    if gram is not None:
        rows += [(f"budget {b} gram", {"budget": b, "gram": gram}) for b in budgets]
    if tune is not None:
        for label, codec, params in SIGN_SETTINGS:
            rows.append((label, {"rules": sign_rules(codec, params)}))
            rows.append((f"{label} tuned", {"rules": sign_rules(codec, params), "tune": tune}))
    return rows


#: (label, codec, params) of the sign-codec settings: BitDelta as published (one scale per
#: matrix) and ComPEFT at its paper's untuned setting (density 0.1, α = 1 times σ(Δ)).
SIGN_SETTINGS = [
    ("bitdelta", "bitdelta", {}),
    ("ComPEFT d=0.1", "ternary", {"density": 0.1}),
]


def eval_target(folder: Path, task: data.Task, work: Path, n: int) -> tuple[Path, TuneSettings]:
    """The fine-tune as a model directory (its encoder and the base's config and tokenizer)
    and the settings to tune scales on its first ``n`` training texts (a JSONL file)."""
    out = work / "ft-model"
    out.mkdir(parents=True, exist_ok=True)
    for f in model.model_dir().iterdir():
        if f.is_file() and f.name != "model.safetensors" and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    weights = out / "model.safetensors"
    if not weights.exists():
        weights.symlink_to((folder / "encoder.safetensors").resolve())
    texts = work / "tune.jsonl"
    rows = [json.dumps({"text": t}) for t in task.train.texts[:n]]
    texts.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out, TuneSettings(str(texts), max_samples=n, batch_size=16, threads=1)


def gram_file(folder: Path, task: data.Task, work: Path, n: int) -> Path:
    """The fine-tune's Gram statistics (with embedding counts) on its first ``n`` training
    texts, as ``potluck stats gram --embeddings`` computes them."""
    from potluck.ops.merge.stats_torch import gram_matrices, input_axes
    from potluck.ops.merge.statsfile import write_stats

    path = work / f"{task.name}.gram_emb.stats"
    enc = model.load_encoder(folder / "encoder.safetensors")
    batches = [
        {k: v for k, v in b.items() if k != "labels"}
        for b in stages._batches(task, model.load_tokenizer(), n, 16)
    ]
    tensors = gram_matrices(enc, batches, lambda m, b: m(**b), embeddings=True)
    axes = {k: v for k, v in input_axes(enc, embeddings=True).items() if k in tensors}
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    work.mkdir(parents=True, exist_ok=True)
    write_stats(path, "gram", tensors, samples=n, tokens=tokens, input_axes=axes)
    return path


def one_run(
    task_name: str, seed: int, folder: Path, args: argparse.Namespace, work: Path
) -> list[dict[str, Any]]:
    """Every setting's row for one cached fine-tune."""
    from potluck.ops.patch.apply import apply_patch
    from potluck.ops.patch.create import create_patch

    task = data.load_task(task_name, seed=seed)
    test = stages.Evaluator([task], "test")
    head = finetune.load_head(folder / "head.safetensors")
    base_p, ft_p = model.base_weights(), folder / "encoder.safetensors"
    probes = stages.RESULTS / f"probes-s{seed}.json"
    probe = json.loads(probes.read_text())[task_name]["test_acc"] if probes.is_file() else None
    e_base, e_ft = test.embed(base_p), test.embed(ft_p)
    acc_ft = test.accuracy(e_ft, task_name, head)
    pred_ft = _pred(e_ft, head)
    shift = float(np.linalg.norm(e_ft - e_base))
    ref = fp16_delta_bytes(base_p, ft_p)
    gram = (
        gram_file(folder, task, work / f"{task_name}-s{seed}", args.gram_n) if args.gram else None
    )
    tune = None
    if args.sign:
        ft_dir, tune = eval_target(folder, task, work / f"{task_name}-s{seed}", args.gram_n)
    rows = []
    for label, kw in settings(args.budgets.split(","), gram, tune):
        patch, out = work / "p.potluck", work / "patched.safetensors"
        target = ft_dir if "tune" in kw else ft_p
        t0 = time.perf_counter()
        info = create_patch(base_p, target, patch, seed=seed, **kw)
        create_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        apply_patch(base_p, patch, out)
        apply_s = time.perf_counter() - t0
        e = test.embed(out)
        acc = test.accuracy(e, task_name, head)
        good = probe is not None and acc_ft - probe >= report.MIN_GAIN
        row = {
            "task": task_name, "seed": seed, "setting": label, "bytes": info.size,
            "x_fp16": ref / info.size, "acc": acc, "acc_ft": acc_ft, "probe": probe,
            "gain_kept": report.gain_kept(acc, probe, acc_ft) if good and probe else None,
            "agree": float(np.mean(_pred(e, head) == pred_ft)),
            "shift_kept": 1 - float(np.linalg.norm(e - e_ft)) / shift if shift else 1.0,
            "create_s": round(create_s, 1), "apply_s": round(apply_s, 1),
            "sign_tensors": sum(e.codec in ("bitdelta", "ternary") for e in info.entries),
            "tuning": None if info.scales is None else info.scales.record(),
        }  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _pred(emb: np.ndarray, head: Any) -> np.ndarray:
    import torch

    with torch.inference_mode():
        out: np.ndarray = head(torch.from_numpy(emb)).argmax(-1).numpy()
    return out


def table(rows: list[dict[str, Any]]) -> str:
    """Per setting, averaged over the runs: x smaller, shift kept, agreement, acc, gain kept."""
    lines = [
        "| setting | × smaller than fp16 delta | shift kept | agree | acc | fine-tune acc "
        "| gain kept | create s | apply s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["setting"] for r in rows):
        rs = [r for r in rows if r["setting"] == label]
        kept = [r["gain_kept"] for r in rs if r["gain_kept"] is not None]
        gk = f"{100 * np.mean(kept):.1f} % ({len(kept)} runs)" if kept else "n/a (no run qualifies)"
        lines.append(
            f"| {label} | {np.mean([r['x_fp16'] for r in rs]):.1f} "
            f"| {np.mean([r['shift_kept'] for r in rs]):.3f} "
            f"| {np.mean([r['agree'] for r in rs]):.3f} "
            f"| {np.mean([r['acc'] for r in rs]):.3f} | {np.mean([r['acc_ft'] for r in rs]):.3f} "
            f"| {gk} | {np.mean([r['create_s'] for r in rs]):.1f} "
            f"| {np.mean([r['apply_s'] for r in rs]):.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure every cached fine-tune; print the markdown table."""
    ap = argparse.ArgumentParser(prog="python -m bench.patch.curves", description=__doc__)
    ap.add_argument("--tasks", default=",".join(data.TASKS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budgets", default="x8,x16,x32,x64")
    ap.add_argument("--recipe", choices=("base", "lpft"), default="base")
    ap.add_argument("--gram", action="store_true", help="also budgets weighted by Gram stats")
    ap.add_argument("--gram-n", type=int, default=64, help="training texts for --gram/--sign")
    ap.add_argument(
        "--sign", action="store_true",
        help="also BitDelta and ComPEFT, with weight-space scales and tuned on --gram-n texts",
    )  # fmt: skip
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    runs = cached_runs(args.tasks.split(","), [int(s) for s in args.seeds.split(",")], args.recipe)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for task_name, seed, steps, folder in runs:
            stages.log(f"{task_name} seed {seed} ({steps} steps): {folder.name}")
            rows += one_run(task_name, seed, folder, args, Path(tmp))
    print(f"\nruns: {[(t, s, st) for t, s, st, _ in runs]}; load {os.getloadavg()}")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"runs": [r[:3] for r in runs], "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
