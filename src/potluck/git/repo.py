"""A potluck repository: a git work tree plus the object store under ``.git/potluck``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from potluck.config import RepoConfig
from potluck.errors import FormatError, UserError
from potluck.git.plumbing import Git
from potluck.objects.manifest import MAGIC, Manifest, is_manifest, parse
from potluck.store.local import LocalStore

if TYPE_CHECKING:  # ops.vcs (numpy, zstandard) loads on first use: git's filter starts without
    from potluck.ops.vcs import ObjectDB

#: Larger blobs or files are never read as manifests (far above a 100k-tensor manifest).
MAX_MANIFEST_BYTES = 64 << 20


class Repo:
    """Paths and handles of one repository. Cheap to create; holds no open processes."""

    def __init__(self, cwd: Path | str = ".") -> None:
        self.root, self.common_dir = Git(Path(cwd)).toplevel_and_common_dir()
        self.git = Git(self.root)
        self.potluck_dir = self.common_dir / "potluck"
        self.config = RepoConfig.load(self.root)
        self.store = LocalStore(self.potluck_dir / "objects")

    @cached_property
    def odb(self) -> ObjectDB:
        """The object database over ``store`` (made on first use)."""
        from potluck.ops.vcs import ObjectDB

        return ObjectDB(self.store, self.config)

    @property
    def tmp_dir(self) -> Path:
        """Scratch space on the same file system as the store (spills, temp files)."""
        d = self.potluck_dir / "tmp"
        d.mkdir(parents=True, exist_ok=True)
        return d

    @property
    def merge_dir(self) -> Path:
        """Where unresolved tensor-level merge conflicts are recorded."""
        return self.potluck_dir / "merge"

    def relpath(self, path: str | Path) -> str:
        """A path relative to the top of the work tree, with forward slashes."""
        p = Path(path)
        if not p.is_absolute():
            p = Path.cwd() / p
        try:
            return p.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            raise UserError(f"{path} is outside the repository {self.root}") from None

    def manifest_at(self, rev: str, path: str) -> Manifest | None:
        """The manifest of ``path`` at ``rev`` (``""`` = the index); None when absent.

        Raises ``FormatError`` when the blob is not a manifest (the file is not tracked by
        potluck at that revision).
        """
        spec = f":{path}" if rev == "" else f"{rev}:{path}"
        blob = self.git.show_blob(spec)
        if blob is None:
            return None
        if not is_manifest(blob):
            raise FormatError(
                f"{spec} is not stored by potluck",
                hint="track it with `potluck track PATTERN` and commit it again",
            )
        return parse(blob, spec)


@contextmanager
def open_worktree_file(repo: Repo, path: str) -> Iterator[tuple[BinaryIO, int]]:
    """Open a work-tree file for reading, with its size."""
    full = repo.root / path
    if not full.exists():
        raise UserError(f"{path}: no such file in the work tree")
    with open(full, "rb") as f:
        yield f, full.stat().st_size


def worktree_manifests(repo: Repo) -> list[tuple[str, bytes]]:
    """Tracked work-tree files that hold a manifest (data not checked out), with their text."""
    out = []
    for path in repo.git.ls_files():
        full = repo.root / path
        if not full.is_file() or full.is_symlink() or full.stat().st_size > MAX_MANIFEST_BYTES:
            continue
        with open(full, "rb") as f:
            if not is_manifest(f.read(len(MAGIC))):
                continue
        out.append((path, full.read_bytes()))
    return out
