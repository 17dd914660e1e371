"""The markdown tables of a results JSON (``python -m bench.quality.report FILE`` reprints;
``... report --seeds FILE FILE FILE``: mean ± sd over seeds and the per-seed method order)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
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


def row_metrics(accs: Mapping[str, float], r: Mapping[str, Any]) -> dict[str, float]:
    """Average accuracy, normalised accuracy (vs the fine-tunes) and gain kept (over the tasks
    of ``gain_tasks``; NaN when none qualifies) of one row of a results dict."""
    tasks = list(r["individual"])
    probe = {t: r["probe"][t]["test_acc"] for t in tasks}
    tuned = r["individual"]
    kept = [gain_kept(accs[t], probe[t], tuned[t]) for t in gain_tasks(r)]
    return {
        "avg": float(np.mean([accs[t] for t in tasks])),
        "norm": float(np.mean([accs[t] / tuned[t] for t in tasks])),
        "kept": float(np.mean(kept)) if kept else float("nan"),
    }


def extra(best: Mapping[str, Any]) -> tuple[float, float]:
    """(mean extra bytes per task, mean bits per parameter per task) of a merges entry: its
    task patches (``tasks``), else (0, 0) — a single merged model carries nothing per task."""
    tasks = best.get("tasks") or {}
    if not tasks:
        return 0.0, 0.0
    return (float(np.mean([w["bytes"] for w in tasks.values()])),
            float(np.mean([w["bits_per_parameter"] for w in tasks.values()])))  # fmt: skip


def _extra_cells(best: Mapping[str, Any] | None) -> str:
    if best is None:
        return " — | — |"
    size, bits = extra(best)
    secs = best.get("merge_s")
    size_txt = "0" if not size else f"{size / 1e6:.2f} MB ({bits:.3f} bit/param)"
    return f" {size_txt} | {'—' if secs is None else secs} |"


def _row(
    label: str,
    accs: Mapping[str, float],
    r: Mapping[str, Any],
    tasks: list[str],
    best: Mapping[str, Any] | None = None,
) -> str:
    m = row_metrics(accs, r)
    cells = [f"{100 * accs[t]:.1f}" for t in tasks]
    kept_txt = "—" if np.isnan(m["kept"]) else f"{100 * m['kept']:.0f}"
    return (
        f"| {label} | "
        + " | ".join(cells)
        + f" | {100 * m['avg']:.1f} | {100 * m['norm']:.1f} | {kept_txt} |"
        + _extra_cells(best)
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
    head += " extra per task | merge s |"
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    lines.append(
        _row("linear probe (frozen base)", {t: r["probe"][t]["test_acc"] for t in tasks}, r, tasks)
    )
    lines.append(_row("individual fine-tunes", r["individual"], r, tasks))
    for method, best in r["merges"].items():
        lines.append(_row(f"merge: {method} ({_params(best)})", best["test"], r, tasks, best))
    gains = [f"{t}: {100 * (r['individual'][t] - r['probe'][t]['test_acc']):+.1f}" for t in tasks]
    lines.append("")
    lines.append("Fine-tuning gain over the probe (points): " + ", ".join(gains))
    return "\n".join(lines)


def gain_table(r: Mapping[str, Any]) -> str:
    """Gain kept (%) per task with a clear gain (``gain_tasks``), per merge, and their mean."""
    good = gain_tasks(r)
    if not good:
        return "(no task whose fine-tune beats the probe by 5 points)"
    lines = ["| merge | " + " | ".join(good) + " | mean |", "|" + "---|" * (len(good) + 2)]
    for method, best in r["merges"].items():
        kept = [gain_kept(best["test"][t], r["probe"][t]["test_acc"], r["individual"][t])
                for t in good]  # fmt: skip
        cells = " | ".join(f"{100 * k:.0f}" for k in kept)
        lines.append(f"| {method} | {cells} | {100 * float(np.mean(kept)):.0f} |")
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
    parts = ["## Merges (test accuracy %)", merge_table(r), "", "## Gain kept per task (%)",
             gain_table(r), "", "## Patches", patch_table(r)]  # fmt: skip
    if g:
        parts += ["", "## git merge through the driver",
                  f"`git merge` of {g['tasks']}: test {g['test']}; max |git − potluck merge| = "
                  f"{g['max_abs_diff_vs_potluck_merge']:.3g}"]  # fmt: skip
    parts += ["", "## Wall time (s)", ", ".join(f"{k}: {v}" for k, v in r["times_s"].items())]
    return "\n".join(parts)


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof 1; 0 for one value), count) over the non-NaN
    values; (NaN, NaN, 0) when there are none."""
    v = [float(x) for x in values if not np.isnan(x)]
    if not v:
        return float("nan"), float("nan"), 0
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)


def _rows(r: Mapping[str, Any]) -> dict[str, Mapping[str, float]]:
    rows: dict[str, Mapping[str, float]] = {
        "linear probe": {t: r["probe"][t]["test_acc"] for t in r["individual"]},
        "individual fine-tunes": r["individual"],
    }
    rows.update({f"merge: {m}": best["test"] for m, best in r["merges"].items()})
    return rows


def _order(methods: Sequence[str], seed: Mapping[str, Mapping[str, float]]) -> list[str]:
    """``methods`` by average accuracy in one seed, best first (ties by name)."""
    return sorted(methods, key=lambda m: (-seed[f"merge: {m}"]["avg"], m))


def aggregate_seeds(
    runs: Sequence[Mapping[str, Any]], names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Per row (probe, fine-tunes, each merge) the per-seed and mean ± sd of average accuracy,
    normalised accuracy and gain kept; per seed the merge methods ordered by average accuracy
    (best first), the gain-kept tasks, and whether the ordering is the same in every seed."""
    per_seed = [{label: row_metrics(accs, r) for label, accs in _rows(r).items()} for r in runs]
    labels = [k for k in per_seed[0] if all(k in s for s in per_seed)]
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for label in labels:
        rows[label] = {}
        for metric in ("avg", "norm", "kept"):
            values = [s[label][metric] for s in per_seed]
            mean, sd, n = mean_sd(values)
            rows[label][metric] = {"values": values, "mean": mean, "sd": sd, "n": n}
    methods = [k.removeprefix("merge: ") for k in labels if k.startswith("merge: ")]
    orders = [_order(methods, s) for s in per_seed]
    return {
        "rows": rows,
        "orders": orders,
        "stable": all(o == orders[0] for o in orders),
        "gain_tasks": [gain_tasks(r) for r in runs],
        "runs": list(names) if names is not None else [str(i) for i in range(len(runs))],
    }


def _pm(cell: Mapping[str, Any], pct: bool = True) -> str:
    if cell["n"] == 0:
        return "—"
    k = 100 if pct else 1
    return f"{k * cell['mean']:.1f} ± {k * cell['sd']:.1f}"


def seeds_markdown(agg: Mapping[str, Any]) -> str:
    """The table of ``aggregate_seeds``: mean ± sd (%) and the per-seed orderings."""
    lines = ["| model | avg acc | normalised | gain kept | gain kept per seed |",
             "|---|---|---|---|---|"]  # fmt: skip
    for label, row in agg["rows"].items():
        per = " / ".join("—" if np.isnan(v) else f"{100 * v:.0f}" for v in row["kept"]["values"])
        lines.append(f"| {label} | {_pm(row['avg'])} | {_pm(row['norm'])} | "
                     f"{_pm(row['kept'])} (n={row['kept']['n']}) | {per} |")  # fmt: skip
    lines.append("")
    for name, order, tasks in zip(agg["runs"], agg["orders"], agg["gain_tasks"], strict=True):
        lines.append(f"- {name}: {' > '.join(order)} (gain-kept tasks: {', '.join(tasks)})")
    lines.append(f"- ordering identical in every run: {'yes' if agg['stable'] else 'no'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``report FILE`` reprints one run; ``report --seeds FILE...`` the mean ± sd over seeds."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--seeds":
        runs = [json.loads(Path(f).read_text()) for f in args[1:]]
        print(seeds_markdown(aggregate_seeds(runs, [Path(f).name for f in args[1:]])))
    else:
        print(markdown(json.loads(Path(args[0]).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
