"""``potluck demo``: a short, realistic history of a tiny transformer versioned with potluck.

Runs in fresh temporary directories with no network: builds a small numpy transformer, commits
a dense fine-tune step, a sparse edit and a partial retrain, branches and merges (one-sided
changes exactly, both-sided ones TIES-merged, the merge commit saying so), reports bytes stored
by potluck against a full copy per version and the tensor-level diffs, shares the history through
a local bare repository, and ships a contributor's fine-tune as a small patch.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from potluck.demo.communal_story import communal_story
from potluck.demo.merge_story import MERGE_RULE, merge_sources, report_merge
from potluck.demo.model import (
    Params,
    TinyConfig,
    dense_step,
    forward,
    init_params,
    lora_update,
    retrain,
    save_safetensors,
    sparse_edit,
)
from potluck.demo.patch_story import patch_story
from potluck.demo.shell import FILE, Log, Row, Shell, commit, dir_bytes, store_bytes
from potluck.git.inspect import FileDiff, load
from potluck.git.inspect import diff as diff_revs
from potluck.git.repo import Repo

__all__ = [
    "FILE",
    "MERGE_RULE",
    "Params",
    "Row",
    "TinyConfig",
    "dense_step",
    "forward",
    "init_params",
    "lora_update",
    "main",
    "merge_sources",
    "retrain",
    "run_demo",
    "save_safetensors",
    "share",
    "sparse_edit",
]


def _history(
    sh: Shell, rng: np.random.Generator
) -> tuple[list[Row], dict[str, str], tuple[Params, Params, Params]]:
    """Commit v1…v4 on main and one commit on branch ``embeddings``, then ``git merge`` it;
    returns the rows, the commit ids and the merge's base, main and branch tensors."""
    rows: list[Row] = []
    p0 = init_params(TinyConfig(), rng)
    revs = {"v1": commit(sh, p0, "v1: pre-trained base", rows)}
    p1 = dense_step(p0, rng)
    revs["v2"] = commit(sh, p1, "v2: dense fine-tune step", rows)
    p2 = sparse_edit(p1, rng)
    revs["v3"] = commit(sh, p2, "v3: sparse knowledge edit (0.5% of one matrix)", rows)
    sh("git", "switch", "-q", "-c", "embeddings")
    p_emb = dense_step(retrain(p2, rng, ("wte", "wpe")), rng, ("h.1.",))
    revs["emb"] = commit(sh, p_emb, "branch: embeddings retrained, layer 1 tuned", rows)
    sh("git", "switch", "-q", "main")
    p3 = dense_step(retrain(p2, rng, ("h.3.",)), rng, ("h.1.",))
    revs["v4"] = commit(sh, p3, "v4: last layer retrained, layer 1 tuned", rows)
    t0 = time.perf_counter()
    before = store_bytes(sh.root)
    sh("git", "merge", "-q", "--no-edit", "embeddings")
    rows.append(
        Row(
            "merge of branch 'embeddings' (git merge)",
            (sh.root / FILE).stat().st_size,
            store_bytes(sh.root) - before,
            time.perf_counter() - t0,
        )
    )
    return rows, revs, (p2, p3, p_emb)


def run_demo(workdir: Path | None = None, log: Log = print) -> dict[str, object]:
    """Run the demo; returns the numbers it printed (for tests)."""
    rng = np.random.default_rng(0)
    root = Path(workdir or tempfile.mkdtemp(prefix="potluck-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    sh = Shell(root, log)
    sh("git", "init", "-q", "-b", "main")
    sh("potluck", "init")
    sh("potluck", "track", "*.safetensors")
    (root / ".potluck.json").write_text(json.dumps({"merge": [MERGE_RULE]}, indent=2))
    sh("git", "add", ".gitattributes", ".potluck.json")
    sh("git", "commit", "-q", "-m", "track checkpoints with potluck; TIES for layer 1 merges")
    rows, revs, sides = _history(sh, rng)
    tokens = rng.integers(0, TinyConfig().vocab, 32)
    res = _report(sh, rows, revs, tokens, log)
    res.update(report_merge(sh, merge_sources(load(str(root / FILE)), *sides), log))
    res.update(share(sh, log))
    res.update(patch_story(sh, Path(str(res["share_root"])) / "hub.git", revs, rng, log))
    res.update(communal_story(root.with_name(root.name + "-communal"), log))
    if importlib.util.find_spec("torch") is not None:  # the routing story needs torch
        from potluck.demo.routing_story import routing_story

        res.update(routing_story(root.with_name(root.name + "-routing"), log))
    return res


def _report(
    sh: Shell,
    rows: list[Row],
    revs: dict[str, str],
    tokens: np.ndarray,
    log: Log,
) -> dict[str, object]:
    repo = Repo(sh.root)
    old = load(str(sh.root / FILE), rev=revs["v1"])
    sh("git", "checkout", "-q", revs["v1"], "--", FILE)
    same = np.array_equal(forward(load(str(sh.root / FILE)), tokens), forward(old, tokens))
    sh("git", "checkout", "-q", "HEAD", "--", FILE)
    full = sum(r.logical for r in rows)
    stored = sum(r.stored_growth for r in rows)
    log(f"potluck demo in {sh.root}\n")
    log(f"{'commit':<50} {'file MiB':>9} {'stored MiB':>11} {'stored %':>9} {'s':>6}")
    for r in rows:
        log(
            f"{r.label:<50} {r.logical / 2**20:>9.2f} {r.stored_growth / 2**20:>11.2f} "
            f"{100 * r.stored_growth / r.logical:>8.1f}% {r.seconds:>6.2f}"
        )
    log(
        f"{'TOTAL: full copy per version vs potluck':<50} {full / 2**20:>9.2f} "
        f"{stored / 2**20:>11.2f} {100 * stored / full:>8.1f}%\n"
    )
    for a, b in (("v1", "v2"), ("v2", "v3"), ("v3", "v4"), ("v4", "HEAD")):
        ra, rb = revs[a], revs.get(b, b)
        log(f"$ potluck diff {a} {b}")
        for d in diff_revs(repo, ra, rb, []):
            _log_diff(d, log)
    log(f"checkout of v1 reproduces v1's logits exactly: {same}\n")
    return {
        "rows": rows,
        "full": full,
        "stored": stored,
        "checkout_ok": same,
        "root": str(sh.root),
    }


def share(sh: Shell, log: Log) -> dict[str, object]:
    """Push to a local bare repository, clone only some tensors from it, load one more tensor
    on demand, then pull the rest; checks the result byte for byte."""
    hub_root = sh.root.with_name(sh.root.name + "-share")
    hub = hub_root / "hub.git"
    partial = hub_root / "partial"
    sh.at(hub_root.parent)("git", "init", "-q", "--bare", "-b", "main", str(hub))
    sh("git", "remote", "add", "origin", str(hub))
    sh("git", "push", "-q", "origin", "main", "embeddings")
    uploaded = dir_bytes(hub / "lfs")
    log(f"\n$ git push origin main embeddings   (pre-push hook uploads objects to {hub}/lfs)")
    log(f"  objects on the remote: {uploaded / 2**20:.2f} MiB for the whole history")
    sh.at(hub_root)("potluck", "-q", "clone", "--include", "wte", str(hub), str(partial))
    cs = sh.at(partial)
    st = json.loads(cs("potluck", "status", "--json"))["not_materialized"]
    log("$ potluck clone --include wte hub.git partial")
    for row in st:
        log(
            f"  left as a manifest: {row['path']}: {row['tensors'] - row['tensors_missing']} "
            f"of {row['tensors']} tensors here"
        )
    store = partial / ".git" / "potluck" / "objects"
    before = dir_bytes(store)
    head = load(str(partial / FILE), names=["h.3.mlp.fc.weight"])["h.3.mlp.fc.weight"]
    on_demand = dir_bytes(store) - before
    log(f'$ python -c \'potluck.load("{FILE}", names=["h.3.mlp.fc.weight"])\'')
    log(
        f"  fetched on demand: {head.nbytes / 2**20:.2f} MiB tensor, "
        f"store grew {on_demand / 2**20:.2f} MiB"
    )
    cs("potluck", "pull", "--include", "*")
    same = (partial / FILE).read_bytes() == (sh.root / FILE).read_bytes()
    log(f"$ potluck pull --include '*'   → {FILE} identical to the pushed one: {same}")
    return {
        "share_root": str(hub_root),
        "pull_ok": same,
        "partial_status": st,
        "on_demand_bytes": on_demand,
        "on_demand_tensor_bytes": head.nbytes,
    }


def _log_diff(d: FileDiff, log: Log) -> None:
    shown = d.changes[:4]
    for c in shown:
        s = c.stats
        extra = f" ‖Δ‖/‖W‖={s.rel:.2e} changed={100 * s.frac_changed:.2f}%" if s else ""
        log(f"  {c.status:<8} {c.name:<24} {c.new or c.old}{extra}")
    if len(d.changes) > len(shown):
        log(f"  … and {len(d.changes) - len(shown)} more changed tensors")
    log(f"  ({d.unchanged} tensors unchanged)")


def main(keep: bool = False) -> int:
    """Entry point of ``potluck demo``."""
    t0 = time.perf_counter()
    res = run_demo()
    print(f"\ndemo finished in {time.perf_counter() - t0:.1f}s")
    keys = ("root", "share_root", "patch_root", "routing_root", "communal_root")
    dirs = [str(res[k]) for k in keys if k in res]
    if not keep:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"repositories kept at {', '.join(dirs)}")
    checks = ["merge_ok", "trailer_ok", "checkout_ok", "pull_ok", "patch_ok"]
    checks += ["gate_pass", "gate_fail"]
    ok = all(res[k] is True for k in checks) and bool(res["patch_refused"])
    return 0 if ok else 1
