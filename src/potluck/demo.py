"""``potluck demo``: a short, realistic history of a tiny transformer versioned with potluck.

Runs in a fresh temporary directory with no network: builds a small numpy transformer, commits
a dense fine-tune step, a sparse edit and a partial retrain, branches and merges, then reports
bytes stored by potluck against a full copy per version, and the tensor-level diffs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from potluck.fileio import atomic_writer
from potluck.git.inspect import diff as diff_revs
from potluck.git.inspect import load
from potluck.git.repo import Repo
from potluck.merging import MERGE_METHODS

Params = dict[str, np.ndarray]
FILE = "model.safetensors"
#: The demo repository's merge rule: tensors of layer 1 changed on both branches are TIES-merged.
MERGE_RULE: dict[str, Any] = {
    "path": "*.safetensors",
    "tensors": "h.1.*",
    "method": "ties",
    "params": {"density": 0.5},
}


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the demo transformer."""

    vocab: int = 2048
    d: int = 256
    layers: int = 4
    ffn: int = 1024
    ctx: int = 64


def init_params(cfg: TinyConfig, rng: np.random.Generator) -> Params:
    """GPT-style parameters, N(0, 0.02) weights, unit norms."""
    p: Params = {
        "wte": rng.normal(0, 0.02, (cfg.vocab, cfg.d)),
        "wpe": rng.normal(0, 0.01, (cfg.ctx, cfg.d)),
        "ln_f.weight": np.ones(cfg.d),
        "ln_f.bias": np.zeros(cfg.d),
    }
    for i in range(cfg.layers):
        h = f"h.{i}."
        p[h + "ln_1.weight"], p[h + "ln_1.bias"] = np.ones(cfg.d), np.zeros(cfg.d)
        p[h + "attn.qkv.weight"] = rng.normal(0, 0.02, (cfg.d, 3 * cfg.d))
        p[h + "attn.proj.weight"] = rng.normal(0, 0.02, (cfg.d, cfg.d))
        p[h + "ln_2.weight"], p[h + "ln_2.bias"] = np.ones(cfg.d), np.zeros(cfg.d)
        p[h + "mlp.fc.weight"] = rng.normal(0, 0.02, (cfg.d, cfg.ffn))
        p[h + "mlp.proj.weight"] = rng.normal(0, 0.02, (cfg.ffn, cfg.d))
    return {k: v.astype(np.float32) for k, v in p.items()}


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    out: np.ndarray = (x - mu) / np.sqrt(var + 1e-5) * w + b
    return out


def forward(p: Params, tokens: np.ndarray, heads: int = 4) -> np.ndarray:
    """Logits of a causal transformer over ``tokens`` (1-D int array)."""
    n = len(tokens)
    x = p["wte"][tokens] + p["wpe"][:n]
    mask = np.triu(np.full((n, n), -1e9, dtype=np.float32), 1)
    layers = len({k.split(".")[1] for k in p if k.startswith("h.")})
    for i in range(layers):
        h = f"h.{i}."
        a = _layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        q, k, v = np.split(a @ p[h + "attn.qkv.weight"], 3, axis=-1)
        dh = q.shape[-1] // heads
        q, k, v = (t.reshape(n, heads, dh).transpose(1, 0, 2) for t in (q, k, v))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(dh) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + (att @ v).transpose(1, 0, 2).reshape(n, -1) @ p[h + "attn.proj.weight"]
        m = _layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        x = x + np.maximum(m @ p[h + "mlp.fc.weight"], 0) @ p[h + "mlp.proj.weight"]
    x = _layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    logits: np.ndarray = x @ p["wte"].T
    return logits


def save_safetensors(p: Params, path: Path) -> None:
    """Write ``p`` as safetensors (sorted names, F32) without the safetensors package."""
    from potluck.formats.safetensors import build_header

    names = sorted(p)
    header = build_header([(n, "F32", tuple(p[n].shape)) for n in names], {"format": "np"})
    with atomic_writer(path) as f:
        f.write(header)
        for n in names:
            f.write(np.ascontiguousarray(p[n], dtype="<f4").tobytes())


def dense_step(
    p: Params, rng: np.random.Generator, prefixes: tuple[str, ...] | None = None
) -> Params:
    """One fine-tuning step: every weight (or those under ``prefixes``) moves a tiny bit."""
    return {
        k: (v + 1e-3 * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32)
        if prefixes is None or k.startswith(prefixes)
        else v
        for k, v in p.items()
    }


def sparse_edit(p: Params, rng: np.random.Generator, layer: int = 2) -> Params:
    """A knowledge edit: 0.5 % of one MLP matrix changes (ROME-like, localised)."""
    q = dict(p)
    w = p[f"h.{layer}.mlp.proj.weight"].copy()
    idx = rng.choice(w.size, size=w.size // 200, replace=False)
    w.reshape(-1)[idx] += rng.normal(0, 0.01, idx.size).astype(np.float32)
    q[f"h.{layer}.mlp.proj.weight"] = w
    return q


def retrain(p: Params, rng: np.random.Generator, prefixes: tuple[str, ...]) -> Params:
    """Some tensors retrained from scratch (new values, same shapes)."""
    return {
        k: (
            rng.normal(0, 0.02, v.shape).astype(np.float32)
            if k.startswith(prefixes) and v.ndim == 2
            else v
        )
        for k, v in p.items()
    }


class _Shell:
    """Runs git in the demo repository, with potluck's scripts on PATH."""

    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        self.root = root
        self.log = log
        bindir = str(Path(sys.executable).parent)
        self.env = dict(
            os.environ,
            PATH=bindir + os.pathsep + os.environ.get("PATH", ""),
            GIT_AUTHOR_NAME="potluck demo",
            GIT_AUTHOR_EMAIL="demo@potluck.invalid",
            GIT_COMMITTER_NAME="potluck demo",
            GIT_COMMITTER_EMAIL="demo@potluck.invalid",
        )

    def __call__(self, *args: str) -> str:
        r = subprocess.run(args, cwd=self.root, env=self.env, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r.stdout


def _store_bytes(root: Path) -> int:
    objects = root / ".git" / "potluck" / "objects"
    return sum(p.stat().st_size for p in objects.rglob("*") if p.is_file())


@dataclass
class Row:
    """One commit of the demo history."""

    label: str
    logical: int
    stored_growth: int
    seconds: float


def _commit(sh: _Shell, p: Params, label: str, rows: list[Row]) -> str:
    before = _store_bytes(sh.root)
    t0 = time.perf_counter()
    save_safetensors(p, sh.root / FILE)
    sh("git", "add", FILE)
    sh("git", "commit", "-q", "-m", label)
    rows.append(
        Row(
            label,
            (sh.root / FILE).stat().st_size,
            _store_bytes(sh.root) - before,
            time.perf_counter() - t0,
        )
    )
    return sh("git", "rev-parse", "HEAD").strip()


def run_demo(workdir: Path | None = None, log: Callable[[str], None] = print) -> dict[str, object]:
    """Run the demo; returns the numbers it printed (for tests)."""
    rng = np.random.default_rng(0)
    root = Path(workdir or tempfile.mkdtemp(prefix="potluck-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    sh = _Shell(root, log)
    sh("git", "init", "-q", "-b", "main")
    sh("potluck", "init")
    sh("potluck", "track", "*.safetensors")
    (root / ".potluck.json").write_text(json.dumps({"merge": [MERGE_RULE]}, indent=2))
    sh("git", "add", ".gitattributes", ".potluck.json")
    sh("git", "commit", "-q", "-m", "track checkpoints with potluck; TIES for layer 1 merges")
    rows: list[Row] = []
    p0 = init_params(TinyConfig(), rng)
    tokens = rng.integers(0, TinyConfig().vocab, 32)
    revs = {"v1": _commit(sh, p0, "v1: pre-trained base", rows)}
    p1 = dense_step(p0, rng)
    revs["v2"] = _commit(sh, p1, "v2: dense fine-tune step", rows)
    p2 = sparse_edit(p1, rng)
    revs["v3"] = _commit(sh, p2, "v3: sparse knowledge edit (0.5% of one matrix)", rows)
    sh("git", "switch", "-q", "-c", "embeddings")
    p_emb = dense_step(retrain(p2, rng, ("wte", "wpe")), rng, ("h.1.",))
    revs["emb"] = _commit(sh, p_emb, "branch: embeddings retrained, layer 1 tuned", rows)
    sh("git", "switch", "-q", "main")
    p3 = dense_step(retrain(p2, rng, ("h.3.",)), rng, ("h.1.",))
    revs["v4"] = _commit(sh, p3, "v4: last layer retrained, layer 1 tuned", rows)
    t0 = time.perf_counter()
    sh("git", "merge", "-q", "--no-edit", "embeddings")
    merged = load(str(root / FILE))
    rows.append(
        Row(
            "merge of branch 'embeddings' (git merge)",
            (root / FILE).stat().st_size,
            0,
            time.perf_counter() - t0,
        )
    )
    res = _report(sh, rows, revs, merged, (p2, p3, p_emb), tokens, log)
    res.update(share(sh, log))
    return res


def merge_sources(merged: Params, base: Params, main: Params, branch: Params) -> dict[str, str]:
    """Where each merged tensor came from, checked exactly: unchanged, main, branch, or TIES
    (equal to ``potluck.merging``'s TIES of both sides against the base, as the rule says)."""
    ties = MERGE_METHODS.get(MERGE_RULE["method"])
    out: dict[str, str] = {}
    for k, v in merged.items():
        if np.array_equal(main[k], branch[k]):
            out[k] = "unchanged" if np.array_equal(v, main[k]) else "WRONG"
        elif np.array_equal(branch[k], base[k]):
            out[k] = "main" if np.array_equal(v, main[k]) else "WRONG"
        elif np.array_equal(main[k], base[k]):
            out[k] = "branch" if np.array_equal(v, branch[k]) else "WRONG"
        else:
            want = ties.merge(
                [main[k], branch[k]], base[k], None, name=k, seed=0, **MERGE_RULE["params"]
            ).astype(np.float32)
            out[k] = "ties" if np.array_equal(v, want) else "WRONG"
    return out


def _report(
    sh: _Shell,
    rows: list[Row],
    revs: dict[str, str],
    merged: Params,
    sides: tuple[Params, Params, Params],
    tokens: np.ndarray,
    log: Callable[[str], None],
) -> dict[str, object]:
    repo = Repo(sh.root)
    sources = merge_sources(merged, *sides)
    ok = "WRONG" not in sources.values()
    old = load(str(sh.root / FILE), rev=revs["v1"])
    sh("git", "checkout", "-q", revs["v1"], "--", FILE)
    same = np.array_equal(forward(load(str(sh.root / FILE)), tokens), forward(old, tokens))
    sh("git", "checkout", "-q", "HEAD", "--", FILE)
    full = sum(r.logical for r in rows[:-1])
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
    log("$ git merge embeddings   (one-sided changes taken exactly; both-sided ones: TIES)")
    for src in ("main", "branch", "ties"):
        names = sorted(k for k, v in sources.items() if v == src)
        log(f"  {src:<7} {len(names):>2} tensors: {', '.join(names)}")
    log(f"merge result verified tensor by tensor: {ok}")
    log(f"checkout of v1 reproduces v1's logits exactly: {same}")
    return {
        "rows": rows,
        "full": full,
        "stored": stored,
        "merge_ok": ok,
        "checkout_ok": same,
        "root": str(sh.root),
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def share(sh: _Shell, log: Callable[[str], None]) -> dict[str, object]:
    """Push to a local bare repository, clone only some tensors from it, load one more tensor
    on demand, then pull the rest; checks the result byte for byte."""
    hub_root = sh.root.with_name(sh.root.name + "-share")
    hub = hub_root / "hub.git"
    partial = hub_root / "partial"
    _Shell(hub_root.parent, log)("git", "init", "-q", "--bare", "-b", "main", str(hub))
    sh("git", "remote", "add", "origin", str(hub))
    sh("git", "push", "-q", "origin", "main", "embeddings")
    uploaded = _dir_bytes(hub / "lfs")
    log(f"\n$ git push origin main embeddings   (pre-push hook uploads objects to {hub}/lfs)")
    log(f"  objects on the remote: {uploaded / 2**20:.2f} MiB for the whole history")
    hs = _Shell(hub_root, log)
    hs("potluck", "-q", "clone", "--include", "wte", str(hub), str(partial))
    cs = _Shell(partial, log)
    st = json.loads(cs("potluck", "status", "--json"))["not_materialized"]
    log("$ potluck clone --include wte hub.git partial")
    for row in st:
        log(f"  left as a manifest: {row['path']}: {row['tensors'] - row['tensors_missing']} "
            f"of {row['tensors']} tensors here")
    store = partial / ".git" / "potluck" / "objects"
    before = _dir_bytes(store)
    head = load(str(partial / FILE), names=["h.3.mlp.fc.weight"])["h.3.mlp.fc.weight"]
    on_demand = _dir_bytes(store) - before
    log(f"$ python -c 'potluck.load(\"{FILE}\", names=[\"h.3.mlp.fc.weight\"])'")
    log(f"  fetched on demand: {head.nbytes / 2**20:.2f} MiB tensor, "
        f"store grew {on_demand / 2**20:.2f} MiB")
    cs("potluck", "pull", "--include", "*")
    same = (partial / FILE).read_bytes() == (sh.root / FILE).read_bytes()
    log(f"$ potluck pull --include '*'   → {FILE} identical to the pushed one: {same}")
    return {"share_root": str(hub_root), "pull_ok": same, "partial_status": st,
            "on_demand_bytes": on_demand, "on_demand_tensor_bytes": head.nbytes}


def _log_diff(d: object, log: Callable[[str], None]) -> None:
    from potluck.git.inspect import FileDiff

    assert isinstance(d, FileDiff)
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
    if not keep:
        shutil.rmtree(str(res["root"]), ignore_errors=True)
        shutil.rmtree(str(res["share_root"]), ignore_errors=True)
    else:
        print(f"repository kept at {res['root']} (remote and clone: {res['share_root']})")
    return 0 if res["merge_ok"] and res["checkout_ok"] and res["pull_ok"] else 1
