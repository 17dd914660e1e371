"""Expert libraries: versioned low-rank / (IA)³ patches of a pinned base, with routing artifacts.

Layout of a library directory (plain files, trackable with git/potluck)::

    library.json                          {"potluck_library": "1"}
    experts/<name>/<version>/
        expert.json                       metadata (canonical JSON, see ``ExpertRecord``)
        expert.patch                      the expert: a potluck patch (PEFT adapters are imported)
        artifacts/arrow.safetensors       Arrow prototypes, one [in] vector per adapted weight
        artifacts/phatgoose.safetensors   PHATGOOSE gate vectors, one [in] vector per weight

An expert's identity is the sha256 of ``expert.patch`` (patches are written canonically, so the
same expert always has the same hash); its base is the patch's pinned base tensor hashes
(``base_digest``). Each artifact file carries, in its safetensors metadata, the expert sha256 and
base digest it was made for; an artifact whose stamps differ from the expert's is *stale* and is
refused (``IntegrityError`` naming the expert).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import Payload, payload_shape_dtype
from potluck.errors import FormatError, IntegrityError, UserError
from potluck.fileio import atomic_dir, atomic_writer, file_sha256
from potluck.formats import scan_file
from potluck.formats.safetensors import build_header
from potluck.modular import arrow_prototype
from potluck.modular.versions import parse_ref, parse_version, resolve
from potluck.ops.models.sources import ModelSource, open_path
from potluck.ops.patch.fileformat import read_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import array_from_bytes, from_numpy

__all__ = [
    "ARTIFACT_KINDS",
    "ExpertDelta",
    "ExpertRecord",
    "Problem",
    "add_expert",
    "attach_artifact",
    "base_mismatches",
    "expert_deltas",
    "find_expert",
    "list_experts",
    "load_artifact",
    "mismatch_error",
    "verify_library",
]

LIBRARY_FILE = "library.json"
EXPERT_FILE = "expert.json"
PATCH_FILE = "expert.patch"
LIBRARY_VERSION = "1"
EXPERT_VERSION = "1"
ARTIFACT_KINDS = ("arrow", "phatgoose")


def _dump_json(path: Path, value: object) -> None:
    text = json.dumps(value, sort_keys=True, indent=2, ensure_ascii=False) + "\n"
    with atomic_writer(path) as f:
        f.write(text.encode("utf-8"))


@dataclass(frozen=True)
class ExpertRecord:
    """One expert version of a library, as ``expert.json`` describes it."""

    name: str
    version: str
    path: Path
    meta: dict[str, Any]

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.name}@{self.version}"

    @property
    def patch_path(self) -> Path:
        """The expert's patch file."""
        return self.path / str(self.meta["patch"]["file"])

    @property
    def sha256(self) -> str:
        """The expert's identity: sha256 of its patch file, as recorded."""
        return str(self.meta["patch"]["sha256"])

    @property
    def base_digest(self) -> str:
        """Digest of the base tensor hashes the expert's patch pins."""
        return str(self.meta["patch"]["base_digest"])

    @property
    def tasks(self) -> list[str]:
        """Task tags (the oracle router routes these task names to this expert)."""
        return [str(t) for t in self.meta.get("tags", [])] or [self.name]

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary (``experts list/show --json``)."""
        return {"name": self.name, "version": self.version, "path": str(self.path), **self.meta}


@dataclass(frozen=True)
class ExpertDelta:
    """One tensor's update by an expert: ``factors`` (a [r, in], b [out, r]), ``dense`` (a
    1-D Δ in ``delta``) or ``ia3`` (``scales`` along ``axis``); ``shape`` is the base tensor's."""

    kind: str
    shape: tuple[int, ...]
    a: np.ndarray | None = None
    b: np.ndarray | None = None
    delta: np.ndarray | None = None
    scales: np.ndarray | None = None
    axis: int = 0


@dataclass(frozen=True)
class Problem:
    """A verify finding about one expert."""

    expert: str
    message: str


def _delta(name: str, p: Payload) -> ExpertDelta:
    shape, _dtype = payload_shape_dtype(p)
    mode = p.meta.get("mode")
    if p.codec == "lowrank" and mode == "factors" and len(shape) == 2:
        return ExpertDelta("factors", shape, a=p.arrays["lora_A"], b=p.arrays["lora_B"])
    if p.codec == "lowrank" and mode == "dense" and len(shape) == 1:
        return ExpertDelta("dense", shape, delta=p.arrays["delta"])
    if p.codec == "ia3" and len(shape) in (1, 2):
        return ExpertDelta("ia3", shape, scales=p.arrays["scales"], axis=int(p.meta["axis"]))
    if p.codec == "task_mask":  # a task part of a tall_masks/emr merge: needs two models
        raise UserError(
            f"tensor {name!r} is a task_mask part of a tall_masks/emr merge: compose serves "
            "low-rank and (IA)³ experts of one base, and a task part also needs the original base",
            hint="rebuild the task with `potluck patch apply MERGED PATCH -o DIR`",
            tensor=name,
        )
    raise UserError(
        f"tensor {name!r} uses codec {p.codec!r} ({mode or 'no mode'}, {len(shape)}-D): an "
        "expert must be a low-rank (LoRA) or (IA)³ patch of 1-D/2-D tensors",
        hint="create the patch with --codec lowrank (or import a LoRA/(IA)³ PEFT adapter)",
        tensor=name,
        codec=p.codec,
    )


def expert_deltas(patch_path: str | os.PathLike[str]) -> dict[str, ExpertDelta]:
    """Every tensor update of an expert patch; a non-expert patch is a ``UserError``."""
    contents = read_patch(patch_path)
    if contents.added or contents.removed:
        raise UserError(
            f"{patch_path}: an expert patch may not add or remove tensors",
            hint="experts only update existing base tensors",
        )
    return {name: _delta(name, p) for name, p in sorted(contents.payloads.items())}


def _kind(deltas: Mapping[str, ExpertDelta]) -> str:
    kinds = {"ia3" if d.kind == "ia3" else "lowrank" for d in deltas.values()}
    return kinds.pop() if len(kinds) == 1 else "mixed"


# ---------------------------------------------------------------------------------- artifacts


def _write_artifact(path: Path, tensors: Mapping[str, np.ndarray], stamps: dict[str, str]) -> None:
    items = sorted((n, np.ascontiguousarray(a, dtype=np.float32)) for n, a in tensors.items())
    specs = [(n, from_numpy(a.dtype), tuple(int(d) for d in a.shape)) for n, a in items]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path) as f:
        f.write(build_header(specs, dict(sorted(stamps.items()))))
        for _n, a in items:
            f.write(a.astype("<f4", copy=False).tobytes())


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """(metadata, tensors) of a safetensors file (copies; the file is closed afterwards)."""
    layout = scan_file(path)
    if layout.format != "safetensors":
        raise FormatError(f"{path}: not a safetensors file", hint="give a .safetensors file")
    out: dict[str, np.ndarray] = {}
    with path.open("rb") as f:
        for seg in layout.tensor_segments():
            f.seek(seg.offset)
            out[seg.name] = array_from_bytes(f.read(seg.length), seg.dtype, seg.shape).copy()
    return dict(layout.metadata), out


def _arrow_vectors(ref: str, deltas: Mapping[str, ExpertDelta]) -> dict[str, np.ndarray]:
    out = {}
    for name, d in deltas.items():
        if d.kind == "factors" and d.a is not None and d.b is not None:
            try:
                out[name] = arrow_prototype(d.a, d.b)
            except UserError as e:
                raise UserError(f"expert {ref}, tensor {name!r}: {e.message}", hint=e.hint) from e
    if not out:
        raise UserError(
            f"expert {ref} has no low-rank factors: Arrow prototypes need LoRA experts",
            hint="leave out --arrow for (IA)³ experts",
            expert=ref,
        )
    return out


def _check_gates(
    ref: str, gates: Mapping[str, np.ndarray], deltas: Mapping[str, ExpertDelta]
) -> None:
    for name, g in sorted(gates.items()):
        d = deltas.get(name)
        if d is None or len(d.shape) != 2:
            raise UserError(
                f"expert {ref}: gate {name!r} is not a 2-D weight the expert updates",
                hint="name gates after the adapted weights (e.g. '…query.weight')",
                expert=ref,
                tensor=name,
            )
        if g.reshape(-1).shape[0] != d.shape[1]:
            raise UserError(
                f"expert {ref}: gate {name!r} has {g.size} entries, the weight has "
                f"{d.shape[1]} inputs",
                hint="a PHATGOOSE gate is one vector over the module's input features",
                expert=ref,
                tensor=name,
            )


def _stamps(kind: str, sha: str, base_digest: str) -> dict[str, str]:
    return {"potluck_artifact": kind, "expert_sha256": sha, "base_digest": base_digest}


def load_artifact(record: ExpertRecord, kind: str) -> dict[str, np.ndarray]:
    """An expert's routing artifact (tensor name → vector), refused when stale or missing."""
    entry = record.meta.get("artifacts", {}).get(kind)
    if entry is None:
        raise UserError(
            f"expert {record.ref} has no {kind} artifact",
            hint=f"add one: potluck experts add … --{kind if kind == 'arrow' else 'gates FILE'}",
            expert=record.ref,
        )
    path = record.path / str(entry["file"])
    if not path.is_file():
        raise IntegrityError(
            f"expert {record.ref}: {kind} artifact {path} is missing",
            hint="restore the library or re-add the expert",
            expert=record.ref,
        )
    meta, tensors = read_safetensors(path)
    _check_stamps(record, kind, meta)
    return tensors


def _check_stamps(record: ExpertRecord, kind: str, meta: Mapping[str, str]) -> None:
    got = (meta.get("potluck_artifact"), meta.get("expert_sha256"), meta.get("base_digest"))
    if got != (kind, record.sha256, record.base_digest):
        raise IntegrityError(
            f"expert {record.ref}: the {kind} artifact is stale (made for expert "
            f"{str(got[1])[:12]}…, base {str(got[2])[:12]}…; the expert is {record.sha256[:12]}…, "
            f"base {record.base_digest[:12]}…)",
            hint="recompute it for this exact expert (potluck experts add --arrow / --gates)",
            expert=record.ref,
            kind=kind,
        )


# ------------------------------------------------------------------------------------ library


def _expert_dir(root: Path, name: str, version: str) -> Path:
    return root / "experts" / name / version


def _read_record(path: Path) -> ExpertRecord:
    try:
        meta = json.loads((path / EXPERT_FILE).read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise FormatError(
            f"{path / EXPERT_FILE}: unreadable expert record ({e})",
            hint="restore the file from version control",
        ) from e
    if not isinstance(meta, dict) or meta.get("potluck_expert") != EXPERT_VERSION:
        raise FormatError(
            f"{path / EXPERT_FILE}: not a potluck expert record (version 1)",
            hint="the library was written by another potluck version",
        )
    return ExpertRecord(str(meta["name"]), str(meta["version"]), path, meta)


def list_experts(root: str | os.PathLike[str]) -> list[ExpertRecord]:
    """Every expert version in the library, by name then version."""
    base = Path(root)
    if not (base / LIBRARY_FILE).is_file():
        raise UserError(
            f"{root}: not an expert library (no {LIBRARY_FILE})",
            hint="create one with potluck experts add --library DIR …",
        )
    out = [_read_record(p.parent) for p in sorted(base.glob(f"experts/*/*/{EXPERT_FILE}"))]
    return sorted(out, key=lambda r: (r.name, parse_version(r.version)))


def find_expert(root: str | os.PathLike[str], ref: str) -> ExpertRecord:
    """The newest version of ``name@constraint`` in the library (``UserError`` when none)."""
    name, constraint = parse_ref(ref)
    versions = {r.version: r for r in list_experts(root) if r.name == name}
    if not versions:
        raise UserError(
            f"no expert {name!r} in library {root}", hint="see potluck experts list", expert=name
        )
    return versions[resolve(name, constraint, list(versions))]


@dataclass
class AddOptions:
    """Metadata and artifacts for ``add_expert``."""

    tags: list[str] = field(default_factory=list)
    license: str | None = None
    description: str | None = None
    evals: dict[str, float] = field(default_factory=dict)
    arrow: bool = False
    gates: str | None = None


def _import_source(source: Path, base: ModelSource | str | None, out: Path) -> dict[str, Any]:
    if source.is_dir():
        if base is None:
            raise UserError(
                f"{source} is a PEFT adapter directory: importing it needs --base",
                hint="pass the base model the adapter was trained on",
            )
        from potluck.ops.peft.importer import import_adapter

        base_path = base if isinstance(base, str) else None
        if base_path is None:
            raise UserError(
                "importing a PEFT adapter needs the base as a path", hint="pass --base PATH"
            )
        report = import_adapter(source, base_path, out)
        adapter = read_patch(out).description.get("adapter_sha256")
        return {"kind": "peft", "peft_type": report.peft_type, "adapter_sha256": adapter}
    shutil.copyfile(source, out)
    return {"kind": "patch"}


def add_expert(
    root: str | os.PathLike[str],
    source: str | os.PathLike[str],
    name: str,
    version: str,
    *,
    base: ModelSource | str | None = None,
    options: AddOptions | None = None,
) -> ExpertRecord:
    """Add ``source`` (a potluck patch file or a PEFT adapter directory) as ``name@version``.

    The patch must consist of low-rank / (IA)³ updates. With ``base`` (a path or an open
    ``ModelSource``), its pinned tensor hashes must match. Arrow prototypes are computed when
    ``options.arrow``; PHATGOOSE gates are read from ``options.gates`` (a safetensors file of
    one vector per adapted weight). Everything is built in a temporary directory and renamed into
    place, so a failure leaves the library unchanged.
    """
    opts = options or AddOptions()
    lib = Path(root)
    parse_ref(name)
    parsed = parse_version(version)
    dest = _expert_dir(lib, name, version)
    same = [p.name for p in dest.parent.glob("*") if _same_version(p.name, parsed)]
    if dest.exists() or same:
        raise UserError(
            f"expert {name}@{(same or [version])[0]} is already in the library",
            hint="bump the version; published versions are immutable",
            expert=name,
        )
    created = _missing_parents(dest)
    new_library = not (lib / LIBRARY_FILE).exists()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if new_library:
            _dump_json(lib / LIBRARY_FILE, {"potluck_library": LIBRARY_VERSION})
        with atomic_dir(dest) as tmp:
            record = _build(tmp, Path(source), name, version, base, opts)
    except BaseException:
        if new_library:
            with contextlib.suppress(OSError):
                (lib / LIBRARY_FILE).unlink()
        for d in created:  # deepest first; only the directories this call made, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return ExpertRecord(name, version, dest, record.meta)


def _missing_parents(dest: Path) -> list[Path]:
    """The directories above ``dest`` that do not exist yet, deepest first."""
    out = []
    for d in dest.parents:
        if d.exists():
            break
        out.append(d)
    return out


def _same_version(text: str, version: tuple[int, ...]) -> bool:
    try:
        return parse_version(text) == version
    except UserError:
        return False


def _check_base(ref: str, pinned: Mapping[str, str], base: ModelSource | str | None) -> None:
    if base is None:
        return
    if isinstance(base, ModelSource):
        bad = base_mismatches(pinned, base, {})
    else:
        with open_path(base) as src:
            bad = base_mismatches(pinned, src, {})
    if bad:
        raise mismatch_error(ref, bad)


def _build(
    tmp: Path,
    source: Path,
    name: str,
    version: str,
    base: ModelSource | str | None,
    opts: AddOptions,
) -> ExpertRecord:
    ref = f"{name}@{version}"
    src_info = _import_source(source, base, tmp / PATCH_FILE)
    deltas = expert_deltas(tmp / PATCH_FILE)
    contents = read_patch(tmp / PATCH_FILE)
    if src_info["kind"] == "patch":  # an imported adapter was already matched to the base
        _check_base(ref, contents.base, base)
    sha = file_sha256(tmp / PATCH_FILE)
    meta: dict[str, Any] = {
        "potluck_expert": EXPERT_VERSION,
        "name": name,
        "version": version,
        "kind": _kind(deltas),
        "tags": sorted(set(opts.tags)),
        "license": opts.license,
        "description": opts.description,
        "evals": dict(sorted(opts.evals.items())),
        "source": src_info,
        "patch": {
            "file": PATCH_FILE,
            "sha256": sha,
            "base_digest": contents.base_digest,
            "tensors": sorted(deltas),
        },
        "artifacts": {},
    }
    stamps = {"expert_sha256": sha, "base_digest": contents.base_digest}
    if opts.arrow:
        _add_artifact(tmp, meta, "arrow", _arrow_vectors(ref, deltas), stamps)
    if opts.gates is not None:
        _gmeta, gates = read_safetensors(Path(opts.gates))
        _check_gates(ref, gates, deltas)
        _add_artifact(tmp, meta, "phatgoose", gates, stamps)
    _dump_json(tmp / EXPERT_FILE, meta)
    return ExpertRecord(name, version, tmp, meta)


def _add_artifact(
    tmp: Path,
    meta: dict[str, Any],
    kind: str,
    tensors: Mapping[str, np.ndarray],
    stamps: dict[str, str],
) -> None:
    rel = f"artifacts/{kind}.safetensors"
    _write_artifact(
        tmp / rel,
        {n: v.reshape(-1) for n, v in tensors.items()},
        _stamps(kind, stamps["expert_sha256"], stamps["base_digest"]),
    )
    meta["artifacts"][kind] = {"file": rel, "sha256": file_sha256(tmp / rel), **stamps}


def base_mismatches(
    pinned: Mapping[str, str], base: ModelSource, cache: dict[str, str]
) -> list[str]:
    """Names of pinned base tensors that ``base`` lacks or holds different bytes for.

    ``cache`` (tensor name → sha256) is filled as tensors are hashed, so several experts of one
    base hash each tensor once.
    """
    present = set(base.names())
    bad = []
    for name, want in sorted(pinned.items()):
        if name not in present:
            bad.append(name)
            continue
        if name not in cache:
            cache[name] = tensor_sha256(base.read(name))
        if cache[name] != want:
            bad.append(name)
    return bad


def mismatch_error(ref: str, bad: list[str]) -> IntegrityError:
    """The error for expert ``ref`` whose pinned base tensors ``bad`` differ from the base."""
    shown = ", ".join(repr(n) for n in bad[:3]) + (
        f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    )
    return IntegrityError(
        f"expert {ref} was made for another base: {shown} differ(s) from its pinned hashes",
        hint="use the base the expert was trained on, or drop the expert",
        expert=ref,
        tensors=bad,
    )


def _verify_one(record: ExpertRecord, base: ModelSource | None, cache: dict[str, str]) -> list[str]:
    out: list[str] = []
    if not record.patch_path.is_file():
        return [f"patch file {record.patch_path} is missing"]
    sha = file_sha256(record.patch_path)
    if sha != record.sha256:
        out.append(f"patch sha256 {sha[:12]}… differs from the recorded {record.sha256[:12]}…")
    try:
        contents = read_patch(record.patch_path)
        expert_deltas(record.patch_path)
    except (UserError, IntegrityError) as e:
        return [*out, e.message]
    if contents.base_digest != record.base_digest:
        out.append("the patch's base digest differs from the recorded one")
    for kind, entry in sorted(record.meta.get("artifacts", {}).items()):
        path = record.path / str(entry["file"])
        if not path.is_file():
            out.append(f"{kind} artifact {entry['file']} is missing")
        elif file_sha256(path) != entry.get("sha256"):
            out.append(f"{kind} artifact {entry['file']} does not match its recorded sha256")
        else:
            try:
                _check_stamps(record, kind, read_safetensors(path)[0])
            except IntegrityError as e:
                out.append(e.message.removeprefix(f"expert {record.ref}: "))
    if base is not None:
        bad = base_mismatches(contents.base, base, cache)
        if bad:
            out.append(
                mismatch_error(record.ref, bad).message.removeprefix(f"expert {record.ref} ")
            )
    return out


def verify_library(
    root: str | os.PathLike[str], *, base: ModelSource | None = None, refs: Iterable[str] = ()
) -> list[Problem]:
    """Check every expert (or those matching ``refs``): patch hash and integrity, expert kind,
    artifact hashes and freshness, and with ``base`` the pinned base tensors. Returns problems."""
    wanted = list(refs)
    records = [find_expert(root, r) for r in wanted] if wanted else list_experts(root)
    cache: dict[str, str] = {}
    return [Problem(r.ref, msg) for r in records for msg in _verify_one(r, base, cache)]


def attach_artifact(
    record: ExpertRecord, kind: str, tensors: Mapping[str, np.ndarray], *, replace: bool = False
) -> ExpertRecord:
    """Add a routing artifact (``phatgoose`` gates, ``arrow`` prototypes) to an existing expert.

    Artifacts are not part of the expert's identity (its patch), so a published version may gain
    one; it is stamped with the expert's sha256 and base digest. An existing artifact of that
    kind is kept unless ``replace``.
    """
    if kind not in ARTIFACT_KINDS:
        raise UserError(f"unknown artifact kind {kind!r}", hint=f"use one of {ARTIFACT_KINDS}")
    if kind in record.meta.get("artifacts", {}) and not replace:
        raise UserError(
            f"expert {record.ref} already has a {kind} artifact",
            hint="pass --replace to overwrite it",
            expert=record.ref,
        )
    deltas = expert_deltas(record.patch_path)
    if kind == "phatgoose":
        _check_gates(record.ref, tensors, deltas)
    meta = json.loads(json.dumps(record.meta))
    meta.setdefault("artifacts", {})
    stamps = {"expert_sha256": record.sha256, "base_digest": record.base_digest}
    _add_artifact(record.path, meta, kind, tensors, stamps)
    _dump_json(record.path / EXPERT_FILE, meta)
    return ExpertRecord(record.name, record.version, record.path, meta)
