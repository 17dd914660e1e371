"""Composition manifests (TOML) and their lockfiles: a base, experts by version, a router.

A manifest is human-edited TOML (read with the standard library's ``tomllib``); paths are
relative to the manifest's directory; top-level keys come before the ``[router]`` table::

    base = "models/tiny-bert"          # model directory or checkpoint file (or dir@rev in a repo)
    library = "experts"                # expert library directory
    model_class = "AutoModel"          # transformers auto class for the runtime
    aggregation = "output"             # output (mixture of expert outputs) | parameters (SMEAR)
    experts = ["sentiment@>=1.0,<2", "topic@*"]

    [router]
    strategy = "arrow"                 # see potluck.modular.ROUTERS
    top_k = 2
    temperature = 1.0
    granularity = "token"              # token | example
    layers = ["*attention*"]           # fnmatch globs over adapted weight names (default: all)
    weights = { sentiment = 0.7, topic = 0.3 }   # static router
    weights_file = "router.safetensors"           # learned / smear router: <weight>.weight/.bias

``lock_manifest`` resolves every expert to its newest matching version, checks that each one's
pinned base tensors match the base (a mismatch is an error naming the expert) and that the
router has what it needs at every routed module (``routed``: fresh Arrow / PHATGOOSE artifacts
from every expert, a learned router's weights), and returns the lock: canonical JSON (sorted
keys, two-space indent, no timestamps), so the same manifest and library always give the same
bytes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomllib

from potluck.codecs import Payload, dense_payload, factors_payload, scales_payload
from potluck.errors import FormatError, IntegrityError, UserError
from potluck.fileio import atomic_writer, file_sha256
from potluck.modular import AGGREGATIONS, GRANULARITIES, ROUTERS, concat_factors
from potluck.modular.versions import parse_ref
from potluck.ops.compose.library import (
    ExpertDelta,
    ExpertRecord,
    base_mismatches,
    expert_deltas,
    find_expert,
    list_experts,
    load_artifact,
    mismatch_error,
)
from potluck.ops.compose.routed import (
    NEEDS,
    check_artifacts,
    check_router_file,
    module_of,
    routed_weights,
    selected,
)
from potluck.ops.models.sources import ModelSource, open_path
from potluck.ops.patch.fileformat import PatchContents, read_patch, write_patch
from potluck.tensors.digests import base_digest

__all__ = [
    "LOCK_VERSION",
    "Composition",
    "Manifest",
    "RouterConfig",
    "default_weights",
    "export_mixture",
    "load_composition",
    "lock_bytes",
    "lock_manifest",
    "module_of",
    "read_manifest",
    "selected_deltas",
    "write_lock",
]

LOCK_VERSION = "1"
_TOP = {"base", "library", "model_class", "aggregation", "experts", "router"}
_ROUTER = {"strategy", "top_k", "temperature", "granularity", "layers", "weights", "weights_file"}
Opener = Callable[[str], ModelSource]


@dataclass(frozen=True)
class RouterConfig:
    """The manifest's ``[router]`` table."""

    strategy: str = "uniform"
    top_k: int | None = None
    temperature: float | None = None
    granularity: str = "token"
    layers: list[str] = field(default_factory=lambda: ["*"])
    weights: dict[str, float] = field(default_factory=dict)
    weights_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The canonical form stored in the lock."""
        return {
            "strategy": self.strategy,
            "top_k": self.top_k,
            "temperature": self.temperature,
            "granularity": self.granularity,
            "layers": list(self.layers),
            "weights": dict(sorted(self.weights.items())),
            "weights_file": self.weights_file,
        }


@dataclass(frozen=True)
class Manifest:
    """A parsed composition manifest."""

    path: Path
    base: str
    library: str
    experts: list[tuple[str, str]]
    router: RouterConfig
    model_class: str = "AutoModel"
    aggregation: str = "output"


def _bad(
    path: Path, what: str, hint: str = "see docs/modular.md for the manifest format"
) -> FormatError:
    return FormatError(f"{path}: {what}", hint=hint, path=str(path))


def _router(path: Path, raw: Any) -> RouterConfig:
    if not isinstance(raw, dict):
        raise _bad(path, "[router] must be a table")
    unknown = sorted(set(raw) - _ROUTER)
    if unknown:
        raise _bad(
            path, f"unknown router key {unknown[0]!r}", f"known: {', '.join(sorted(_ROUTER))}"
        )
    strategy = str(raw.get("strategy", "uniform"))
    ROUTERS.get(strategy)
    gran = str(raw.get("granularity", "token"))
    if gran not in GRANULARITIES:
        raise _bad(path, f"unknown granularity {gran!r}", f"use one of {', '.join(GRANULARITIES)}")
    layers = raw.get("layers", ["*"])
    if isinstance(layers, str):
        layers = [layers]
    weights = raw.get("weights", {})
    if not isinstance(weights, dict):
        raise _bad(path, "router.weights must be a table {expert = weight}")
    temp = raw.get("temperature")
    return RouterConfig(
        strategy,
        None if raw.get("top_k") is None else int(raw["top_k"]),
        None if temp is None else float(temp),
        gran,
        [str(x) for x in layers],
        {str(k): float(v) for k, v in weights.items()},
        raw.get("weights_file"),
    )


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Parse and check a TOML manifest (unknown keys, bad references and options are errors)."""
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text("utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise _bad(p, f"cannot read the manifest: {e}") from e
    unknown = sorted(set(raw) - _TOP)
    if unknown:
        raise _bad(p, f"unknown key {unknown[0]!r}", f"known: {', '.join(sorted(_TOP))}")
    for key in ("base", "library", "experts"):
        if key not in raw:
            raise _bad(p, f"missing {key!r}")
    refs = [parse_ref(str(r)) for r in raw["experts"]]
    names = [n for n, _ in refs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise _bad(p, f"expert {dup[0]!r} is listed twice", "list each expert once")
    if not refs:
        raise _bad(p, "no experts listed")
    agg = str(raw.get("aggregation", "output"))
    if agg not in AGGREGATIONS:
        raise _bad(p, f"unknown aggregation {agg!r}", f"use one of {', '.join(AGGREGATIONS)}")
    return Manifest(
        p,
        str(raw["base"]),
        str(raw["library"]),
        refs,
        _router(p, raw.get("router", {})),
        str(raw.get("model_class", "AutoModel")),
        agg,
    )


def _rel(root: Path, spec: str) -> str:
    return spec if os.path.isabs(spec) else str(root / spec)


def _expert_entry(
    rec: ExpertRecord, constraint: str, lib: Path, router: RouterConfig
) -> dict[str, Any]:
    need = NEEDS.get(router.strategy)
    arts: dict[str, str] = {}
    if need is not None:
        load_artifact(rec, need)  # refuses a missing or stale artifact, naming the expert
        arts[need] = str(rec.meta["artifacts"][need]["sha256"])
    return {
        "name": rec.name,
        "version": rec.version,
        "constraint": constraint,
        "sha256": rec.sha256,
        "base_digest": rec.base_digest,
        "kind": rec.meta.get("kind"),
        "path": rec.path.relative_to(lib).as_posix(),
        "artifacts": arts,
    }


def _check_router(
    m: Manifest, records: list[ExpertRecord], root: Path, routed: list[str]
) -> dict[str, Any]:
    r = m.router
    names = [rec.name for rec in records]
    if r.top_k is not None and not 1 <= r.top_k <= len(names):
        raise _bad(
            m.path,
            f"router.top_k={r.top_k} but {len(names)} expert(s) are listed",
            f"use 1 ≤ top_k ≤ {len(names)}",
        )
    if r.strategy == "static":
        missing = [n for n in names if n not in r.weights]
        extra = sorted(set(r.weights) - set(names))
        if missing or extra:
            raise _bad(
                m.path,
                f"router.weights must name each expert once (missing {missing}, unknown {extra})",
            )
    if not routed:
        raise _bad(
            m.path,
            f"router.layers {r.layers} select no module the experts adapt",
            "widen router.layers (fnmatch globs over adapted weight names, default '*')",
        )
    check_artifacts(r.strategy, records, routed, m.path)
    if r.strategy in ("learned", "smear"):
        if r.weights_file is None:
            raise _bad(m.path, f"the {r.strategy} router needs router.weights_file")
        path = Path(_rel(root, r.weights_file))
        check_router_file(path, r.strategy, routed, len(records))
        return {"weights_file_sha256": file_sha256(path)}
    return {}


def _moved(spec: str | None, root: Path, lock_dir: Path | None) -> str | None:
    """``spec`` (relative to the manifest) re-expressed relative to the lock's directory."""
    if spec is None or lock_dir is None or os.path.isabs(spec):
        return spec
    return Path(os.path.relpath(root / spec, lock_dir)).as_posix()


def lock_manifest(
    path: str | os.PathLike[str],
    *,
    open_base: Opener = open_path,
    lock_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Resolve a manifest into its lock (see the module doc); nothing is written.

    Relative paths in the lock are relative to ``lock_dir`` (default: the manifest's directory),
    where the lockfile is meant to be written.
    """
    m = read_manifest(path)
    root = m.path.parent
    here = None if lock_dir is None else Path(lock_dir).absolute()
    root_abs = root.absolute()
    lib = Path(_rel(root, m.library))
    list_experts(lib)
    records = [find_expert(lib, f"{n}@{c}") for n, c in m.experts]
    pinned: dict[str, str] = {}
    cache: dict[str, str] = {}
    updated: list[list[str]] = []
    with open_base(_rel(root, m.base)) as base:
        for rec in records:
            contents = read_patch(rec.patch_path)
            bad = base_mismatches(contents.base, base, cache)
            if bad:
                raise mismatch_error(rec.ref, bad)
            pinned.update(contents.base)
            updated.append(list(contents.payloads))
    routed = routed_weights(updated, m.router.layers)
    router = {**m.router.to_json(), **_check_router(m, records, root, routed)}
    router["weights_file"] = _moved(m.router.weights_file, root_abs, here)
    return {
        "potluck_lock": LOCK_VERSION,
        "manifest_sha256": hashlib.sha256(m.path.read_bytes()).hexdigest(),
        "base": {
            "path": _moved(m.base, root_abs, here),
            "tensors": dict(sorted(pinned.items())),
            "digest": base_digest(pinned),
        },
        "library": _moved(m.library, root_abs, here),
        "model_class": m.model_class,
        "aggregation": m.aggregation,
        "experts": [
            _expert_entry(rec, c, lib, m.router)
            for rec, (_n, c) in zip(records, m.experts, strict=True)
        ],
        "router": router,
    }


def lock_bytes(lock: dict[str, Any]) -> bytes:
    """The lockfile's canonical bytes."""
    return (json.dumps(lock, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_lock(path: str | os.PathLike[str], lock: dict[str, Any]) -> int:
    """Write the lock atomically; return its size."""
    data = lock_bytes(lock)
    with atomic_writer(path) as f:
        f.write(data)
    return len(data)


@dataclass(frozen=True)
class Composition:
    """A verified lock: the records of its experts and where the base is."""

    root: Path
    lock: dict[str, Any]
    experts: list[ExpertRecord]

    @property
    def base(self) -> str:
        """The base model path (absolute, or as the manifest gave it)."""
        return _rel(self.root, str(self.lock["base"]["path"]))

    @property
    def router(self) -> dict[str, Any]:
        """The router settings."""
        return dict(self.lock["router"])

    def targets(self, names: list[str]) -> list[str]:
        """The adapted weight names the router's ``layers`` globs select."""
        globs = self.router.get("layers") or ["*"]
        return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]

    def router_file(self) -> Path | None:
        """The learned router's weights file, checked against the lock."""
        wf = self.router.get("weights_file")
        if wf is None or self.router["strategy"] not in ("learned", "smear"):
            return None
        path = Path(_rel(self.root, str(wf)))
        if file_sha256(path) != self.router.get("weights_file_sha256"):
            raise IntegrityError(
                f"router weights {path} changed since the lock was made",
                hint="re-run potluck compose lock",
            )
        return path


def _locked_record(lib: Path, entry: dict[str, Any]) -> ExpertRecord:
    ref = f"{entry['name']}@{entry['version']}"
    rec = find_expert(lib, f"{entry['name']}@=={entry['version']}")
    if rec.sha256 != entry["sha256"] or file_sha256(rec.patch_path) != entry["sha256"]:
        raise IntegrityError(
            f"expert {ref} in the library differs from the lock ({entry['sha256'][:12]}…)",
            hint="re-run potluck compose lock, or restore the library",
            expert=ref,
        )
    for kind, sha in entry.get("artifacts", {}).items():
        load_artifact(rec, kind)
        if rec.meta["artifacts"][kind]["sha256"] != sha:
            raise IntegrityError(
                f"expert {ref}: the {kind} artifact differs from the lock",
                hint="re-run potluck compose lock",
                expert=ref,
            )
    return rec


def load_composition(path: str | os.PathLike[str], *, open_base: Opener = open_path) -> Composition:
    """A manifest (``*.toml``, locked in memory) or a lockfile, with every hash verified."""
    p = Path(path)
    if p.suffix == ".toml":
        lock = lock_manifest(p, open_base=open_base)
    else:
        try:
            lock = json.loads(p.read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise FormatError(f"{p}: unreadable lockfile ({e})", hint="re-run compose lock") from e
        if not isinstance(lock, dict) or lock.get("potluck_lock") != LOCK_VERSION:
            raise FormatError(
                f"{p}: not a potluck lockfile (version 1)", hint="re-run compose lock"
            )
    lib = Path(_rel(p.parent, str(lock["library"])))
    records = [_locked_record(lib, e) for e in lock["experts"]]
    return Composition(p.parent, lock, records)


# ------------------------------------------------------------------------------ fixed mixtures


def selected_deltas(
    comp: Composition, *, all_modules: bool = False
) -> list[dict[str, ExpertDelta]]:
    """Per expert (lock order), its deltas of the modules the router's ``layers`` select (all
    of them with ``all_modules``)."""
    layers = ["*"] if all_modules else list(comp.router.get("layers") or ["*"])
    out = []
    for rec in comp.experts:
        deltas = expert_deltas(rec.patch_path)
        keep = set(selected(deltas, layers))
        out.append({n: d for n, d in deltas.items() if n in keep})
    return out


def default_weights(comp: Composition) -> dict[str, float]:
    """Static router weights when the router is static, else 1/E for every expert."""
    router = comp.router
    if router["strategy"] == "static":
        return {str(k): float(v) for k, v in router["weights"].items()}
    return {rec.name: 1.0 / len(comp.experts) for rec in comp.experts}


def _mix_tensor(name: str, parts: list[tuple[ExpertDelta, float]], dtype: str) -> Payload:
    kinds = {d.kind for d, _w in parts}
    if len(kinds) != 1:
        raise UserError(
            f"tensor {name!r} is updated by experts of different kinds ({sorted(kinds)})",
            hint="a fixed mixture of one tensor needs all its experts low-rank or all (IA)³",
            tensor=name,
        )
    kind, shape = kinds.pop(), parts[0][0].shape
    if kind == "factors":
        factors = [(np.asarray(d.a), np.asarray(d.b)) for d, _w in parts]
        a, b = concat_factors(factors, [w for _d, w in parts])
        return factors_payload(b, a, shape=shape, dtype=dtype)
    if kind == "dense":
        delta = sum(w * np.asarray(d.delta, np.float64) for d, w in parts)
        arr = np.asarray(delta, dtype=np.asarray(parts[0][0].delta).dtype)
        return dense_payload(arr, shape=shape, dtype=dtype)
    axes = {d.axis for d, _w in parts}
    if len(axes) != 1:
        raise UserError(
            f"tensor {name!r}: (IA)³ experts scale different axes", hint="drop one", tensor=name
        )
    s = 1.0 + sum(w * (np.asarray(d.scales, np.float64) - 1.0) for d, w in parts)
    scales = np.asarray(s, dtype=np.asarray(parts[0][0].scales).dtype)
    return scales_payload(scales, axes.pop(), shape=shape, dtype=dtype)


def export_mixture(
    comp: Composition,
    out: str | os.PathLike[str],
    weights: dict[str, float] | None = None,
    *,
    all_modules: bool = False,
) -> dict[str, Any]:
    """Write the fixed mixture Σ wₑ·expertₑ as one ordinary potluck patch of the base.

    Low-rank experts are concatenated (A = [A₁; …], B = [w₁B₁ | …]: exact, rank Σ rₑ), dense
    bias deltas and (IA)³ scales (s = 1 + Σ wₑ(sₑ − 1)) are combined linearly, so applying the
    patch gives the output-aggregated composition with those static weights at zero overhead.
    Like the composition, it covers the modules the router's ``layers`` select (every module the
    experts adapt with ``all_modules``); the summary's ``left_out`` names the expert updates
    outside them, so nothing is dropped unsaid.
    """
    w = default_weights(comp) if weights is None else dict(weights)
    names = [rec.name for rec in comp.experts]
    unknown = sorted(set(w) - set(names))
    if unknown:
        raise UserError(
            f"no expert {unknown[0]!r} in the composition",
            hint=f"experts: {', '.join(names)}",
            expert=unknown[0],
        )
    per_tensor: dict[str, list[tuple[ExpertDelta, float]]] = {}
    pins: dict[str, str] = {}
    dtypes: dict[str, str] = {}
    left_out: set[str] = set()
    for rec, deltas in zip(
        comp.experts, selected_deltas(comp, all_modules=all_modules), strict=True
    ):
        contents = read_patch(rec.patch_path)
        if w.get(rec.name, 0.0) != 0.0:
            left_out.update(set(contents.payloads) - set(deltas))
        for name, d in deltas.items():
            if w.get(rec.name, 0.0) != 0.0:
                per_tensor.setdefault(name, []).append((d, w[rec.name]))
                pins[name] = contents.base[name]
                dtypes[name] = str(contents.payloads[name].meta["dtype"])
    payloads = {n: _mix_tensor(n, parts, dtypes[n]) for n, parts in sorted(per_tensor.items())}
    desc = {
        "composition": [
            {"name": r.name, "version": r.version, "sha256": r.sha256, "weight": w.get(r.name, 0.0)}
            for r in comp.experts
        ]
    }
    size = write_patch(out, PatchContents(payloads, pins, {}, [], [], desc))
    return {
        "path": str(out),
        "size": size,
        "tensors": sorted(payloads),
        "weights": w,
        "left_out": sorted(left_out),
        "layers": ["*"] if all_modules else list(comp.router.get("layers") or ["*"]),
    }
