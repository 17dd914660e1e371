"""Lineage across git history: the edges of the commits that changed a model.

Nothing is written at commit time: an edge of a commit is derived when it is read, from what the
commit already pins (docs/lineage.md says why). For each commit that changed a model (a
potluck-tracked checkpoint file, or a model directory: all its weight files together):

* the model directory at that commit holds a ``lineage.json`` (a single file: ``<file>.lineage.
  json`` beside it) whose ``weights_digest`` is the committed weights' digest (an output of
  ``potluck merge`` / ``patch apply`` / ``peft apply`` / ``compose export`` committed as is):
  its edges;
* the commit is a merge: relation ``merge``, every parent commit that has the model, method and
  parameters from the ``Potluck-Merge`` trailers the merge driver wrote (``potluck.git.
  merge_record``);
* otherwise: the first parent's version of the model, relation ``finetune`` (``quantized``
  when only dtypes changed).

Digests come from the manifests (tensor oids are the tensors' sha256), so walking costs no
tensor decoding except for PyTorch views.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from potluck.errors import FormatError, GitError, PotluckError, UserError
from potluck.fileio import file_sha256
from potluck.formats import scan_file
from potluck.git.merge_record import TRAILER, commit_trailers
from potluck.git.models import open_model
from potluck.git.repo import Repo
from potluck.objects.manifest import Manifest, is_manifest, parse
from potluck.ops.compose import ExpertRecord, find_expert
from potluck.ops.compose.rebase import rebase_expert
from potluck.ops.lineage import (
    Edge,
    Lineage,
    Parent,
    manifest_hashes,
    parse_lineage,
    read_lineage,
    weights_digest_of,
)
from potluck.ops.lineage.edge import LINEAGE_FILE
from potluck.ops.models.sources import ModelSource
from potluck.ops.patch import read_patch
from potluck.ops.patch.card import relation
from potluck.ops.patch.rebase import RebaseReport, rebase_patch
from potluck.ops.vcs import TensorLoader
from potluck.tensors.digests import weights_digest

__all__ = [
    "LineageResult",
    "ModelVersion",
    "find_base",
    "lineage_of",
    "model_paths",
    "open_old_base",
    "rebase_expert_in_repo",
    "rebase_patch_in_repo",
    "version_at",
    "walk",
]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
_MODEL_DIR_MARKERS = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass
class ModelVersion:
    """A model at one commit: its weights digest, per-tensor ``(dtype, shape, sha256)`` and the
    ``lineage.json`` blob of its directory (None when there is none)."""

    digest: str
    hashes: dict[str, tuple[str, tuple[int, ...], str]]
    lineage_blob: bytes | None = None


@dataclass
class _Cache:
    versions: dict[tuple[str, str], ModelVersion | None] = field(default_factory=dict)


def _weight_blobs(repo: Repo, commit: str, path: str) -> list[tuple[str, str]]:
    """(path, blob) of the weight files of the model ``path`` at ``commit`` (a file: itself; a
    directory: its top-level weight files)."""
    blobs = repo.git.list_blobs(commit, [path])
    if len(blobs) == 1 and blobs[0][0] == path:
        return blobs
    prefix = path.rstrip("/") + "/"
    return [
        (p, b)
        for p, b in blobs
        if p.startswith(prefix) and "/" not in p[len(prefix) :] and p.endswith(_WEIGHT_SUFFIXES)
    ]


def version_at(repo: Repo, commit: str, path: str) -> ModelVersion | None:
    """The model ``path`` (file or directory) at ``commit``; None when it has no checkpoint
    stored by potluck there."""
    manifests: list[Manifest] = []
    labels: list[str] = []
    for p, blob in _weight_blobs(repo, commit, path):
        data = repo.git.show_blob(blob)
        if data is not None and is_manifest(data):
            manifests.append(parse(data, f"{commit}:{p}"))
            labels.append(p)
    if not manifests:
        return None

    def read_view(m: Manifest, name: str) -> Any:
        return TensorLoader(m, repo.odb).load([name])[name]

    hashes = manifest_hashes(manifests, read_view, labels)
    single = len(manifests) == 1 and path.endswith(_WEIGHT_SUFFIXES)
    beside = f"{path}.{LINEAGE_FILE}" if single else f"{path.rstrip('/')}/{LINEAGE_FILE}"
    lineage_blob = repo.git.show_blob(f"{commit}:{beside}")
    return ModelVersion(weights_digest(hashes), hashes, lineage_blob)


def model_paths(repo: Repo, rev: str) -> list[str]:
    """The models stored by potluck at ``rev``: a directory holding ``config.json`` or a shard
    index counts as one model (all its weight files); any other weight file is a model."""
    blobs = repo.git.list_blobs(rev)
    names = {p for p, _ in blobs}
    out: list[str] = []
    for p, blob in blobs:
        if not p.endswith(_WEIGHT_SUFFIXES):
            continue
        data = repo.git.show_blob(blob)
        if data is None or not is_manifest(data):
            continue
        parent = str(PurePosixPath(p).parent)
        is_dir_model = parent != "." and any(f"{parent}/{m}" in names for m in _MODEL_DIR_MARKERS)
        out.append(parent if is_dir_model else p)
    return list(dict.fromkeys(out))


def _commits(repo: Repo, rev: str, path: str, limit: int) -> list[tuple[str, list[str], bool]]:
    """(commit, parents, whether it is a squash merge the merge driver recorded), newest first."""
    fmt = f"--format=%H %P%x1f%(trailers:key={TRAILER},valueonly,separator=%x1e)%x00"
    raw = repo.git.run("log", f"--max-count={limit}", fmt, rev, "--", ":(top,literal)" + path)
    out = []
    for record in raw.decode("utf-8", "surrogateescape").split("\0"):
        ids, _, values = record.strip("\n").partition("\x1f")
        if ids.split():
            out.append((ids.split()[0], ids.split()[1:], "; squashed " in values))
    return out


def _version(repo: Repo, cache: _Cache, commit: str, path: str) -> ModelVersion | None:
    key = (commit, path)
    if key not in cache.versions:
        cache.versions[key] = version_at(repo, commit, path)
    return cache.versions[key]


def walk(repo: Repo, rev: str = "HEAD", path: str | None = None, limit: int = 200) -> list[Edge]:
    """The lineage edges of the commits reachable from ``rev`` that changed a model (``path``,
    or every model stored at ``rev``), newest first, at most ``limit`` commits per model."""
    commit = repo.git.rev_parse(f"{rev}^{{commit}}")
    if commit is None:
        raise UserError(f"unknown revision {rev!r}", hint="check `git log` / branches")
    paths = [path] if path is not None else model_paths(repo, commit)
    cache = _Cache()
    edges: list[Edge] = []
    for p in paths:
        for c, parents, squash in _commits(repo, commit, p, limit):
            if squash and len(parents) == 1:
                edges += _squash_edges(repo, cache, c, parents[0], p)
            else:
                edges += _commit_edges(repo, cache, c, parents, p)
    return edges


def _commit_edges(
    repo: Repo, cache: _Cache, commit: str, parents: list[str], path: str
) -> list[Edge]:
    child = _version(repo, cache, commit, path)
    if child is None:
        return []  # the model was deleted here
    recorded = _recorded(child, commit, path)
    if recorded:
        return recorded
    pins = [(p, _version(repo, cache, p, path)) for p in parents]
    found = [(p, v) for p, v in pins if v is not None]
    if not found or (any(v.digest == child.digest for _, v in found) and len(found) == 1):
        return []  # added here (a root), or only non-weight files changed
    if len(parents) > 1:
        return [_merge_edge(repo, commit, path, child, found)]
    first, version = found[0]
    relation, method, params = _single_parent_relation(version, child)
    return [
        Edge(child.digest, (Parent(first, version.digest),), relation, method, params,
             commit=commit, path=path, source="commit")
    ]  # fmt: skip


def _recorded(child: ModelVersion, commit: str, path: str) -> list[Edge]:
    """The edges of a committed lineage file that describes these very weights."""
    if child.lineage_blob is None:
        return []
    single = path.endswith(_WEIGHT_SUFFIXES)
    where = f"{commit}:{path}{'.' if single else '/'}{LINEAGE_FILE}"
    try:
        lin = parse_lineage(child.lineage_blob, where)
    except FormatError:
        return []  # a damaged file vouches for nothing; the commit's own edge is derived
    if lin.weights_digest != child.digest or not lin.edges:
        return []
    first = lin.edges[0]
    head = Edge(first.child, first.parents, first.relation, first.method, first.params,
                commit=commit, path=path, refs=first.refs, source="lineage.json")  # fmt: skip
    return [head, *lin.edges[1:]]


def _single_parent_relation(
    parent: ModelVersion, child: ModelVersion
) -> tuple[str, str | None, dict[str, Any]]:
    a, b = parent.hashes, child.hashes
    same_layout = a.keys() == b.keys() and all(a[n][1] == b[n][1] for n in a)
    changed_dtypes = sorted({(a[n][0], b[n][0]) for n in a if n in b and a[n][0] != b[n][0]})
    if same_layout and changed_dtypes:
        casts = [f"{x}->{y}" for x, y in changed_dtypes]
        return "quantized", "cast", {"dtypes": casts}
    changed = sum(1 for n in b if a.get(n) != b[n])
    return "finetune", None, {"tensors_changed": changed, "tensors": len(b)}


def _merge_edge(
    repo: Repo,
    commit: str,
    path: str,
    child: ModelVersion,
    found: list[tuple[str, ModelVersion]],
) -> Edge:
    groups: list[dict[str, Any]] = []
    for wpath, _blob in _weight_blobs(repo, commit, path):
        for value in commit_trailers(repo.git, [commit], wpath).get(commit, []):
            groups += parse_trailer(value)
    methods = sorted({g["method"] for g in groups if g["method"] not in ("ours", "theirs")})
    method = methods[0] if len(methods) == 1 else ("mixed" if methods else None)
    params: dict[str, Any] = {}
    if method not in (None, "mixed"):
        g = next(g for g in groups if g["method"] == method)
        params = dict(g["params"])
    if groups:
        params["groups"] = groups
    parents = tuple(Parent(c, v.digest) for c, v in found)
    return Edge(child.digest, parents, "merge", method, params, commit=commit, path=path,
                source="merge-trailer")  # fmt: skip


def _squash_edges(repo: Repo, cache: _Cache, commit: str, parent: str, path: str) -> list[Edge]:
    """A squash merge the driver recorded: a merge edge from the first parent and the squashed
    branch's tip (named with its weights digest by the trailer: the tip is no parent of the
    commit and may never have been fetched here)."""
    child, first = _version(repo, cache, commit, path), _version(repo, cache, parent, path)
    if child is None or first is None:
        return _commit_edges(repo, cache, commit, [parent], path)
    squashed: list[tuple[str, str]] = []
    for wpath, _blob in _weight_blobs(repo, commit, path):
        for value in commit_trailers(repo.git, [commit], wpath).get(commit, []):
            m = _SQUASHED.search(value)
            if m is not None:
                squashed.append((m["commit"], m["digest"]))
    if not squashed:
        return _commit_edges(repo, cache, commit, [parent], path)
    tip = squashed[0][0]
    theirs = _version(repo, cache, tip, path) if repo.git.rev_parse(tip + "^{commit}") else None
    if theirs is None and path.endswith(_WEIGHT_SUFFIXES):  # one file: its digest is the model's
        theirs = ModelVersion(squashed[0][1], {})
    if theirs is None:
        return _commit_edges(repo, cache, commit, [parent], path)
    edge = _merge_edge(repo, commit, path, child, [(parent, first), (tip, theirs)])
    return [replace(edge, params={**edge.params, "squash": True}, source="squash-trailer")]


_SQUASHED = re.compile(r"; squashed (?P<commit>[0-9a-f]{40,64}) (?P<digest>[0-9a-f]{64})$")
_GROUP = re.compile(r"^(?P<method>[A-Za-z0-9_.-]+)(?:\((?P<args>.*)\))? (?P<n>\d+) tensors?$")
_ARG_SPLIT = re.compile(r", (?=[A-Za-z_][A-Za-z0-9_]*=)")


def parse_trailer(value: str) -> list[dict[str, Any]]:
    """The method groups of one ``Potluck-Merge`` trailer value (``PATH: ties(density=0.2,
    seed=0) 12 tensors; ours 2 tensors; one-sided: …``): method, params, seed, tensor count."""
    if value.startswith('"'):  # a quoted path (it has spaces, ':', ';' or '"')
        try:
            _, end = json.JSONDecoder().raw_decode(value)
        except ValueError:
            return []
        rest = value[end:].removeprefix(": ")
    else:
        rest = value.partition(": ")[2]
    out: list[dict[str, Any]] = []
    for part in rest.split("; "):
        m = _GROUP.match(part.strip())
        if m is None or m["method"] in ("one-sided:", "conflicts:"):
            continue
        params: dict[str, Any] = {}
        for arg in _ARG_SPLIT.split(m["args"]) if m["args"] else []:
            key, _, text = arg.partition("=")
            try:
                params[key] = json.loads(text)
            except ValueError:
                params[key] = text
        seed = params.pop("seed", None)
        out.append({"method": m["method"], "params": params, "seed": seed, "tensors": int(m["n"])})
    return out


def find_base(
    repo: Repo, base: dict[str, str], revs: tuple[str, ...] = ("--all",), limit: int = 500
) -> tuple[str, str, ModelVersion] | None:
    """A commit and model path whose tensors have the sha256s ``base`` pins (a patch's base):
    searched over the history of every model stored at ``HEAD``, newest first."""
    head = repo.git.rev_parse("HEAD^{commit}")
    if head is None:
        return None
    cache = _Cache()
    for path in model_paths(repo, head):
        raw = repo.git.run("log", f"--max-count={limit}", "--format=%H", *revs, "--",
                           ":(top,literal)" + path)  # fmt: skip
        for c in raw.decode().split():
            v = _version(repo, cache, c, path)
            if v is not None and _matches(v, base):
                return c, path, v
    return None


def _matches(version: ModelVersion, base: dict[str, str]) -> bool:
    return all(n in version.hashes and version.hashes[n][2] == h for n, h in base.items())


@dataclass
class LineageResult:
    """What ``potluck lineage TARGET`` shows: the edges, newest first, and notes about them."""

    target: str
    kind: str  # "revision", "directory", "file" or "patch"
    edges: list[Edge]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form: target, kind, edges (``lineage.json``'s edge objects plus ``source``)."""
        return {
            "edges": [dict(e.to_dict(), source=e.source) for e in self.edges],
            "kind": self.kind,
            "notes": self.notes,
            "target": self.target,
        }


def lineage_of(target: str | None, path: str | None = None, limit: int = 200) -> LineageResult:
    """The lineage of ``target``: a patch file, an output directory or file with a lineage file,
    a model path in a repository (its history at HEAD) or a revision (default HEAD; ``path``
    narrows it to one model)."""
    if target is not None and os.path.exists(target):
        if os.path.isfile(target) and _is_patch(target):
            return _patch_lineage(target)
        lin = read_lineage(target)
        if lin is not None:
            return _output_lineage(target, lin)
        repo = _repo_near(target)
        rel = repo.relpath(target)
        return LineageResult(target, "file", walk(repo, "HEAD", rel, limit))
    repo = _repo_near(".")
    rev = target or "HEAD"
    return LineageResult(rev, "revision", walk(repo, rev, path, limit))


def _repo_near(path: str) -> Repo:
    p = Path(path).absolute()
    try:
        return Repo(p if p.is_dir() else p.parent)
    except GitError:
        raise UserError(
            f"{path}: not in a git repository and has no {LINEAGE_FILE}",
            hint="pass an output directory potluck wrote, a patch file, or run inside a repository",
            path=path,
        ) from None


def _output_lineage(target: str, lin: Lineage) -> LineageResult:
    now = weights_digest_of(target)
    notes = []
    if now != lin.weights_digest:
        notes.append(
            f"the weights in {target} changed after the lineage was written (digest "
            f"{now[:12]}, lineage says {lin.weights_digest[:12]}): its edges are not vouched for"
        )
    return LineageResult(target, "directory" if os.path.isdir(target) else "file",
                         list(lin.edges), notes)  # fmt: skip


def _is_patch(path: str) -> bool:
    try:
        return "potluck_patch" in scan_file(Path(path)).metadata
    except PotluckError:
        return False


def _patch_lineage(target: str) -> LineageResult:
    """A patch pins its base by the sha256s of the tensors it reads: an edge from that base
    (found in the repository's history when there is one here) to the patch's content digest."""
    patch = read_patch(target)
    base_pin = Parent(None, patch.base_digest)
    notes = [f"the patch pins its base by base_digest {patch.base_digest[:12]} "
             f"(the sha256s of the {len(patch.base)} tensors it reads)"]  # fmt: skip
    refs: tuple[str, ...] = ()
    with contextlib.suppress(PotluckError):
        found = find_base(Repo(Path(target).absolute().parent), patch.base)
        if found is not None:
            commit, mpath, version = found
            base_pin = Parent(commit, version.digest)
            refs = (f"{mpath}@{commit[:10]}",)
            notes.append(f"base found in this repository: {mpath} at {commit[:10]}")
    codecs = sorted({p.codec for p in patch.payloads.values()})
    rel = "adapter" if relation(patch) == "adapter" else "patch"
    rel = "compose" if "composition" in patch.description else rel  # `compose export`
    edge = Edge(
        file_sha256(target), (base_pin,), rel,
        ",".join(codecs) or None,
        {"base_digest": patch.base_digest, "description": patch.description},
        path=target, refs=refs, source="patch",
    )  # fmt: skip
    edges = [edge]
    rebased = patch.description.get("rebased")
    if isinstance(rebased, dict):  # `potluck patch rebase` wrote it: ported from an old base
        with contextlib.suppress(FormatError):
            edges.append(_rebase_edge(edge.child, rebased, target))
    return LineageResult(target, "patch", edges, notes)


def _rebase_edge(child: str, rebased: dict[str, Any], target: str) -> Edge:
    """The edge ``patch rebase`` recorded in the patch's description."""
    doc = {
        "child": child,
        "parents": [
            {"digest": rebased.get("new_base_digest"), "ref": "new base"},
            {"digest": rebased.get("old_base_digest"), "ref": "old base"},
        ],
        "relation": "patch",
        "method": "rebase",
        "params": {k: rebased.get(k) for k in ("method", "params", "seed", "from_patch_sha256")},
        "path": target,
    }
    return Edge.from_dict(doc, f"{target}: description.rebased")


def open_old_base(patch_path: str, old_base: str | None) -> ModelSource:
    """The base a patch was made against: ``old_base`` (a path or ``path@rev``) when given,
    else found by the sha256s the patch pins in the history of the repository holding the
    patch (``find_base``). The caller closes it."""
    if old_base is not None:
        return open_model(old_base)
    patch = read_patch(patch_path)
    found = None
    with contextlib.suppress(GitError):
        found = find_base(Repo(Path(patch_path).absolute().parent), patch.base)
    if found is None:
        raise UserError(
            f"{patch_path}: no model in this repository's history has the base tensors the patch "
            f"pins (base_digest {patch.base_digest[:12]})",
            hint="name the old base with --old-base PATH or PATH@REV",
        )
    commit, path, _version = found
    root = Repo(Path(patch_path).absolute().parent).root
    return open_model(f"{root / path}@{commit}")


def rebase_patch_in_repo(
    patch_path: str,
    onto: str,
    out_path: str,
    *,
    old_base: str | None = None,
    **options: Any,
) -> RebaseReport:
    """``potluck patch rebase``: ``rebase_patch`` with the old base from ``open_old_base`` and
    the new one opened by ``open_model`` (paths or ``path@rev``); ``options`` go through."""
    with open_old_base(patch_path, old_base) as old, open_model(onto) as new:
        return rebase_patch(patch_path, old, new, out_path, **options)


def rebase_expert_in_repo(
    library: str,
    ref: str,
    onto: str,
    version: str,
    *,
    old_base: str | None = None,
    **options: Any,
) -> tuple[ExpertRecord, RebaseReport]:
    """``potluck experts rebase``: ``rebase_expert`` with the old base from ``open_old_base``
    (the expert's patch pins it) and the new one opened by ``open_model``."""
    patch = str(find_expert(library, ref).patch_path)
    with open_old_base(patch, old_base) as old, open_model(onto) as new:
        return rebase_expert(library, ref, old, new, version, **options)
