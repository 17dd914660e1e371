"""The tensor page: dtype, shape, hash, history, histograms of the values and of the delta."""

from __future__ import annotations

from typing import Any

import numpy as np
import sqlalchemy as sa

from potluck.hub import index as ix
from potluck.hub import svg
from potluck.hub.pages import Hub, NotFound, resolve
from potluck.objects.manifest import Manifest
from potluck.ops.vcs import load_tensors

HIST_BINS = 40
_BLOCK = 1 << 20  # elements per block: histogram memory stays ~8 MB whatever the tensor


def _floats(a: np.ndarray) -> np.ndarray:
    flat = a.reshape(-1)
    if flat.dtype.kind == "c":
        flat = flat.real
    try:
        return flat.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        return flat.view(np.uint8).astype(np.float64)


def hist(a: np.ndarray, minus: np.ndarray | None = None) -> dict[str, Any]:
    """Counts of the finite values of ``a`` (or of ``a - minus``) over ``HIST_BINS`` equal bins,
    in blocks of ``_BLOCK`` elements: no float64 copy of the whole tensor is made."""
    flat, n = a.reshape(-1), a.size
    other = None if minus is None else minus.reshape(-1)

    def block(i: int) -> np.ndarray:
        f = _floats(flat[i : i + _BLOCK])
        if other is not None:
            f = f - _floats(other[i : i + _BLOCK])
        finite: np.ndarray = f[np.isfinite(f)]
        return finite

    lo, hi = np.inf, -np.inf
    for i in range(0, n, _BLOCK):
        f = block(i)
        if f.size:
            lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    if not np.isfinite(lo):
        return {"counts": [], "lo": 0.0, "hi": 0.0}
    if hi == lo:
        hi = lo + 1.0
    counts = np.zeros(HIST_BINS, dtype=np.int64)
    for i in range(0, n, _BLOCK):
        counts += np.histogram(block(i), bins=HIST_BINS, range=(lo, hi))[0]
    return {"counts": counts.tolist(), "lo": lo, "hi": hi}


def _manifest(hub: Hub, name: str, sha: str, path: str) -> Manifest:
    with hub.engine.connect() as c:
        paths = c.execute(
            sa.select(ix.COMMITS.c.paths).where(ix.COMMITS.c.repo == name, ix.COMMITS.c.sha == sha)
        ).scalar()
    if paths is None or path not in paths.split("\n"):
        raise NotFound(
            f"no model file {path!r} at {sha[:12]}", hint="pick a file from the commit's page"
        )
    return hub.models_of(name).at(sha)[path]


def _names(m: Manifest) -> set[str]:
    return set(m.tensors()) | {v.name for v in m.views}


def _history(hub: Hub, name: str, path: str, tensor: str) -> list[dict[str, Any]]:
    t, c = ix.CHANGES, ix.COMMITS
    first_parent = sa.func.substr(c.c.parents, 1, 40)
    with hub.engine.connect() as conn:
        return ix.rows(
            conn,
            sa.select(c.c.sha, c.c.time, c.c.subject, t.c.status, t.c.old, t.c.new, t.c.rel)
            .join(c, sa.and_(c.c.repo == t.c.repo, c.c.sha == t.c.head, t.c.base == first_parent))
            .where(t.c.repo == name, t.c.path == path, t.c.name == tensor)
            .order_by(c.c.time.desc(), c.c.sha)
            .limit(200),
        )


def tensor(hub: Hub, name: str, rev: str, path: str, tensor_name: str) -> dict[str, Any]:
    """One tensor of one model file at one revision."""
    sha = resolve(hub, name, rev)
    m = _manifest(hub, name, sha, path)
    if tensor_name not in _names(m):
        raise NotFound(f"no tensor {tensor_name!r} in {path} at {sha[:12]}")
    odb = hub.repo(name).odb
    value = load_tensors(m, odb, [tensor_name])[tensor_name]
    entry = m.tensors().get(tensor_name)
    out: dict[str, Any] = {
        "repo": name,
        "commit": sha,
        "path": path,
        "name": tensor_name,
        "dtype": entry.dtype if entry else str(value.dtype),
        "shape": list(value.shape),
        "sha256": entry.oid if entry else None,
        "history": _history(hub, name, path, tensor_name),
        "values": hist(value),
        "delta": None,
        "delta_unchanged": False,
        "delta_base": None,
    }
    out["values_svg"] = svg.histogram(
        out["values"]["counts"], out["values"]["lo"], out["values"]["hi"], "values"
    )
    _add_delta(hub, name, sha, m, path, tensor_name, value, out)
    return out


def _add_delta(
    hub: Hub,
    name: str,
    sha: str,
    m: Manifest,
    path: str,
    tname: str,
    value: np.ndarray,
    out: dict[str, Any],
) -> None:
    """The histogram of (this − the first parent's version), when the parent has it, same shape."""
    with hub.engine.connect() as c:
        parents = c.execute(
            sa.select(ix.COMMITS.c.parents).where(
                ix.COMMITS.c.repo == name, ix.COMMITS.c.sha == sha
            )
        ).scalar()
    base = (parents or "").split()[:1]
    if not base:
        return
    pm = hub.models_of(name).at(base[0]).get(path)
    if pm is None or tname not in _names(pm):
        return
    old_e, new_e = pm.tensors().get(tname), m.tensors().get(tname)
    if old_e is not None and new_e is not None and old_e.oid == new_e.oid:
        out["delta_base"], out["delta_unchanged"] = base[0], True  # same bytes: nothing to load
        return
    old = load_tensors(pm, hub.repo(name).odb, [tname])[tname]
    if old.shape != value.shape:
        return
    out["delta"], out["delta_base"] = hist(value, old), base[0]
    out["delta_svg"] = svg.histogram(
        out["delta"]["counts"], out["delta"]["lo"], out["delta"]["hi"], "delta vs first parent"
    )
