"""The markdown tables of a results JSON (``python -m bench.quality.report FILE`` reprints)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def max_abs_diff(a: Path, b: Path) -> float:
    """The largest |a − b| over all tensors of two safetensors files with the same names."""
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    if set(x) != set(y):
        return float("inf")
    return max(float(np.max(np.abs(x[n].astype(np.float64) - y[n]))) for n in x if x[n].size)


def gain_kept(merged: float, probe: float, tuned: float) -> float:
    """(merged − probe) / (fine-tuned − probe)."""
    return (merged - probe) / (tuned - probe) if tuned != probe else float("nan")


#: A task counts for "gain kept" when fine-tuning beats the probe by at least this much.
MIN_GAIN = 0.05


def gain_tasks(r: Mapping[str, Any]) -> list[str]:
    """Tasks whose fine-tune beats the linear probe by at least ``MIN_GAIN`` on test."""
    return [t for t, a in r["individual"].items() if a - r["probe"][t]["test_acc"] >= MIN_GAIN]


def _row(label: str, accs: Mapping[str, float], r: Mapping[str, Any], tasks: list[str]) -> str:
    probe = {t: r["probe"][t]["test_acc"] for t in tasks}
    tuned = r["individual"]
    cells = [f"{100 * accs[t]:.1f}" for t in tasks]
    avg = float(np.mean([accs[t] for t in tasks]))
    norm = float(np.mean([accs[t] / tuned[t] for t in tasks]))
    good = gain_tasks(r)
    kept = [gain_kept(accs[t], probe[t], tuned[t]) for t in good]
    kept_txt = f"{100 * float(np.mean(kept)):.0f}" if kept else "—"
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {100 * avg:.1f} | {100 * norm:.1f} | {kept_txt} |"
    )


def _params(best: Mapping[str, Any]) -> str:
    cfg = best["config"]
    per = {k: v for k, v in cfg["models"][0]["parameters"].items() if k != "weight"}
    return ", ".join(f"{k}={v}" for k, v in {**cfg["parameters"], **per}.items()) or "—"


def merge_table(r: Mapping[str, Any]) -> str:
    """Per task and average: probe, fine-tune, each merge; normalised acc and gain kept."""
    tasks = list(r["individual"])
    good = ", ".join(gain_tasks(r)) or "none"
    head = "| model | " + " | ".join(tasks) + f" | avg | normalised | gain kept % ({good}) |"
    lines = [head, "|" + "---|" * (len(tasks) + 4)]
    lines.append(
        _row("linear probe (frozen base)", {t: r["probe"][t]["test_acc"] for t in tasks}, r, tasks)
    )
    lines.append(_row("individual fine-tunes", r["individual"], r, tasks))
    for method, best in r["merges"].items():
        lines.append(_row(f"merge: {method} ({_params(best)})", best["test"], r, tasks))
    gains = [f"{t}: {100 * (r['individual'][t] - r['probe'][t]['test_acc']):+.1f}" for t in tasks]
    lines.append("")
    lines.append("Fine-tuning gain over the probe (points): " + ", ".join(gains))
    return "\n".join(lines)


def patch_table(r: Mapping[str, Any]) -> str:
    """Per codec, averaged over tasks: size vs the fp16 delta, accuracy, gain kept."""
    pt = r.get("patches") or {}
    if not pt:
        return "(patches not run)"
    tasks = list(pt)
    codecs = [row["codec"] for row in pt[tasks[0]]]
    lines = ["| codec | MB (avg) | × smaller than fp16 delta | avg acc | gain kept % |",
             "|---|---|---|---|---|"]  # fmt: skip
    for i, codec in enumerate(codecs):
        rows = [pt[t][i] for t in tasks]
        good = set(gain_tasks(r))
        kept = np.mean([
            gain_kept(row["test_acc"], r["probe"][t]["test_acc"], r["individual"][t])
            for t, row in zip(tasks, rows, strict=True) if t in good
        ] or [float("nan")])  # fmt: skip
        lines.append(
            f"| {codec} | {np.mean([x['bytes'] for x in rows]) / 1e6:.2f} | "
            f"{np.mean([x['ratio_vs_fp16'] for x in rows]):.1f} | "
            f"{100 * np.mean([x['test_acc'] for x in rows]):.1f} | {100 * kept:.0f} |"
        )
    fp16 = np.mean([pt[t][0]["fp16_delta_bytes"] for t in tasks]) / 1e6
    lines.append("")
    lines.append(f"fp16 delta (2 bytes × changed parameters), average over tasks: {fp16:.1f} MB")
    return "\n".join(lines)


def markdown(r: Mapping[str, Any]) -> str:
    """All tables of one run."""
    g = r.get("git", {}).get("gitmerge", {})
    parts = ["## Merges (test accuracy %)", merge_table(r), "", "## Patches", patch_table(r)]
    if g:
        parts += ["", "## git merge through the driver",
                  f"`git merge` of {g['tasks']}: test {g['test']}; max |git − potluck merge| = "
                  f"{g['max_abs_diff_vs_potluck_merge']:.3g}"]  # fmt: skip
    parts += ["", "## Wall time (s)", ", ".join(f"{k}: {v}" for k, v in r["times_s"].items())]
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())))
