"""Model references for commands that read whole models: a path, or ``path@rev`` in a repository.

``open_model("base/")`` opens a file or Hugging Face directory on disk; ``open_model(
"model.safetensors@v1")`` or ``open_model("models/llama@main")`` reads the tensors stored by
potluck at that revision (fetching missing objects from the remote first), and a work-tree file
that is still a manifest (partial clone) is read from the store the same way. Config and tokenizer
files of a directory at a revision are copied from git into a temporary directory, so a derived
model can carry them.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import numpy as np

from potluck.errors import UserError
from potluck.git.inspect import split_rev
from potluck.git.repo import Repo
from potluck.git.sync import fetch_manifest
from potluck.objects.manifest import MAGIC, Manifest, TensorEntry, is_manifest, parse
from potluck.ops.models import ModelSource, TensorInfo, open_path
from potluck.ops.vcs import TensorLoader, missing_objects
from potluck.ops.vcs.materialize import write_file
from potluck.tensors.dtypes import array_from_bytes

__all__ = ["SPILL_BYTES", "open_model"]

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")
#: A stored tensor at least this large is decoded into a memory-mapped temporary file (deleted
#: at once, so nothing is left behind even on kill -9) instead of into memory: blockwise readers
#: (merge, patch) then hold only the pages they use, whatever the tensor's size.
SPILL_BYTES = 16 << 20


def open_model(spec: str) -> ModelSource:
    """Open ``spec``: a path on disk, or ``path@rev`` in the repository that contains it."""
    p = Path(spec)
    if p.exists():
        if p.is_file() and _is_placeholder(p):
            repo = Repo(p.absolute().parent)
            rel = repo.relpath(p)
            m = parse(p.read_bytes(), f"work-tree file {rel}")
            return _store_source(repo, {rel: m}, spec, None, None)
        return open_path(p)
    path, rev = split_rev(spec)
    if rev is None:
        raise UserError(f"{spec}: no such file or directory", hint="check the model path")
    return _at_rev(path, rev, spec)


def _is_placeholder(p: Path) -> bool:
    with p.open("rb") as f:
        return is_manifest(f.read(len(MAGIC)))


def _repo_for(path: str) -> Repo:
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return Repo(probe if probe.is_dir() else probe.parent)


def _at_rev(path: str, rev: str, spec: str) -> ModelSource:
    repo = _repo_for(path)
    rel = repo.relpath(Path(path).absolute())
    commit = repo.git.rev_parse(f"{rev}^{{commit}}")
    if commit is None:
        raise UserError(f"{spec}: unknown revision {rev!r}", hint="check `git log` / branches")
    blobs = repo.git.list_blobs(commit, [rel])
    if not blobs:
        raise UserError(f"{spec}: {rel} does not exist at {rev}", hint="check `git ls-tree`")
    single = len(blobs) == 1 and blobs[0][0] == rel
    weights = [b for b, _ in blobs if b.endswith(_WEIGHT_SUFFIXES) and "/" not in b[len(rel) + 1 :]]
    if single:
        weights = [rel]
    manifests: dict[str, Manifest] = {}
    for w in sorted(weights):
        m = repo.manifest_at(commit, w)
        if m is not None:
            manifests[w] = m
    if not manifests:
        raise UserError(
            f"{spec}: no checkpoint stored by potluck there",
            hint="the path must be a tracked checkpoint file or a directory holding some",
        )
    config_dir = None if single else _config_files(repo, commit, rel)
    return _store_source(repo, manifests, spec, commit, config_dir)


def _config_files(repo: Repo, commit: str, rel: str) -> Path | None:
    """The directory's non-weight top-level files and the sentence-transformers module folders
    its ``modules.json`` names, copied from ``commit`` into a temporary directory (what
    ``layout_files`` then picks from); None when there are none. A checkpoint potluck tracks
    inside a module folder (``2_Dense/model.safetensors``) is written back whole."""
    prefix = f"{rel}/"
    blobs = {p[len(prefix) :]: oid for p, oid in repo.git.list_blobs(commit, [rel])}
    top = [n for n in blobs if "/" not in n and not n.endswith(_WEIGHT_SUFFIXES)]
    tmp = Path(tempfile.mkdtemp(prefix="potluck-model-"))
    try:
        for name in top:
            _write_blob(repo, f"{commit}:{rel}/{name}", tmp / name)
        folders = _module_paths(tmp / "modules.json")
        for name in blobs:
            if any(name.startswith(f"{f}/") for f in folders):
                _write_blob(repo, f"{commit}:{rel}/{name}", tmp / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not top:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return tmp


def _module_paths(modules_json: Path) -> list[str]:
    """Module folders a sentence-transformers ``modules.json`` names (relative, inside)."""
    try:
        modules = json.loads(modules_json.read_bytes())
    except (OSError, ValueError):
        return []
    paths = (
        [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    )
    return [
        PurePosixPath(p).as_posix()
        for p in paths
        if isinstance(p, str)
        and p
        and not PurePosixPath(p).is_absolute()
        and ".." not in PurePosixPath(p).parts
    ]


def _write_blob(repo: Repo, rev_path: str, dest: Path) -> None:
    """Write a blob to ``dest``; a potluck manifest is written as the file it describes."""
    data = repo.git.show_blob(rev_path)
    if data is None:
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not is_manifest(data):
        dest.write_bytes(data)
        return
    m = parse(data, rev_path)
    if missing_objects(m, repo.odb):
        fetch_manifest(repo, m, rev_path.split(":", 1)[1])
    with dest.open("wb") as f:
        write_file(m, repo.odb, f, path=rev_path)


def _store_source(
    repo: Repo,
    manifests: dict[str, Manifest],
    spec: str,
    commit: str | None,
    config_dir: Path | None,
) -> ModelSource:
    infos: dict[str, TensorInfo] = {}
    readers: dict[str, Callable[[], np.ndarray]] = {}
    files: dict[str, str] = {}
    known: dict[str, str] = {}
    metadata: dict[str, dict[str, str]] = {}  # each safetensors file's __metadata__ travels
    spill = _Spill(repo)
    for path, m in manifests.items():
        if m.format == "safetensors":
            metadata[Path(path).name] = dict(m.metadata)
        if missing_objects(m, repo.odb):
            fetch_manifest(repo, m, path)
        loader = TensorLoader(m, repo.odb)  # built once per file: reads stay O(1) per tensor
        for name, e in loader.tensors.items():
            if name in infos:
                raise UserError(f"{spec}: tensor {name!r} appears in two files")
            infos[name] = TensorInfo(name, e.dtype, tuple(e.shape))
            readers[name] = spill.reader(e, loader)
            known[name] = e.oid  # the sha256 of the tensor's little-endian bytes
            files[name] = Path(path).name

    identity = {"path": spec}
    if commit:
        identity["commit"] = commit
    src = ModelSource(
        spec, infos, lambda n: readers[n](), files=files, config_dir=config_dir,
        identity=identity, metadata=metadata, releasers=spill.releasers, known_sha256=known,
    )  # fmt: skip
    if config_dir is not None and config_dir.name.startswith("potluck-model-"):
        src.closers.append(lambda: shutil.rmtree(config_dir, ignore_errors=True))
    return src


class _Spill:
    """Reads stored tensors; one of ``SPILL_BYTES`` or more is decoded chunk by chunk into an
    unlinked temporary file (under the repository's ``.git/potluck/tmp``) that the returned array
    maps, so the decoded bytes live in the page cache, not in the process. The file's space is
    freed when the array is dropped (or the process ends, however it ends). ``releasers`` let
    go of mapped pages a caller is done with (``ModelSource.release``)."""

    def __init__(self, repo: Repo) -> None:
        self.repo = repo
        self.maps: dict[str, weakref.ref[mmap.mmap]] = {}
        self.releasers: dict[str, Callable[[int, int | None], None]] = {}

    def reader(self, e: TensorEntry, loader: TensorLoader) -> Callable[[], np.ndarray]:
        if e.size < SPILL_BYTES:
            return lambda: loader(e.name)
        self.releasers[e.name] = lambda start, length: self._release(e.name, start, length)
        return lambda: self._read(e)

    def _read(self, e: TensorEntry) -> np.ndarray:
        mm = _decode_to_map(self.repo, e)
        self.maps[e.name] = weakref.ref(mm)
        return array_from_bytes(memoryview(mm), e.dtype, e.shape)

    def _release(self, name: str, start: int, length: int | None) -> None:
        ref = self.maps.get(name)
        mm = None if ref is None else ref()
        if mm is None:
            return
        lo = max(0, start) // mmap.PAGESIZE * mmap.PAGESIZE
        hi = len(mm) if length is None else min(len(mm), start + length)
        if hi > lo:
            with contextlib.suppress(ValueError, OSError):  # closed, or not supported here
                mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def _decode_to_map(repo: Repo, e: TensorEntry) -> mmap.mmap:
    """The logical bytes of ``e``'s object in a read-only map of an unlinked temporary file."""
    fd, name = tempfile.mkstemp(prefix="tensor-", suffix=".tmp", dir=repo.tmp_dir)
    try:
        os.unlink(name)
        with os.fdopen(os.dup(fd), "wb") as f:
            for chunk in repo.odb.read_chunks(e.oid):  # verified: raises at the end if corrupt
                f.write(chunk)
            written = f.tell()
        if written != e.size:
            raise UserError(
                f"object {e.oid[:12]} of tensor {e.name!r} holds {written} bytes, not {e.size}",
                hint="the store is inconsistent; run `potluck fsck`",
            )
        return mmap.mmap(fd, e.size, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
