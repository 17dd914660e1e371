"""Repository settings that decide object identity and storage. Frozen; passed explicitly."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from potluck.errors import UserError

CONFIG_FILE = ".potluck.json"


@dataclass(frozen=True)
class MergeRule:
    """How the merge driver combines tensors changed on both sides of a merge.

    The first rule whose ``path`` glob matches the file and whose ``tensors`` glob matches the
    tensor name applies. ``method`` is a merge-method name (``ties``, ``linear``, …; see
    ``potluck.merging``), or ``ours`` / ``theirs`` / ``conflict`` (the default: leave it to
    ``potluck resolve``). ``params`` go to the method; ``seed`` keys its randomness.
    """

    path: str = "*"
    tensors: str = "*"
    method: str = "conflict"
    params: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    @classmethod
    def from_dict(cls, raw: Any) -> MergeRule:
        """Parse one rule, refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        if not isinstance(raw, dict) or set(raw) - known:
            raise UserError(
                f"{CONFIG_FILE}: bad merge rule {raw!r}", hint=f"a rule has keys {sorted(known)}"
            )
        return cls(**raw)


@dataclass(frozen=True)
class RepoConfig:
    """Settings stored in the repository (``.potluck.json`` at the top level).

    ``hash`` names the content hash of manifests and objects (only ``sha256`` today).
    ``max_delta_depth`` bounds delta chains so checkout cost does not grow with history.
    ``chunk_bytes`` is the unit of streaming and of encoding choice inside an object.
    ``zstd_level`` is the compression level of stored objects (does not change identity).
    ``merge`` lists ``MergeRule``s for tensors changed on both sides of a git merge.
    """

    format_version: int = 1
    hash: str = "sha256"
    max_delta_depth: int = 8
    chunk_bytes: int = 4 * 1024 * 1024
    zstd_level: int = 1
    merge: tuple[MergeRule, ...] = ()

    def to_json(self) -> str:
        """Canonical JSON text of these settings."""
        return json.dumps(asdict(self), sort_keys=True, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> RepoConfig:
        """Parse settings, refusing unknown keys and bad values."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{CONFIG_FILE} is not valid JSON: {e}", hint="fix or delete it") from e
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise UserError(
                f"{CONFIG_FILE} has unknown keys {unknown}", hint=f"known keys: {sorted(known)}"
            )
        raw["merge"] = tuple(MergeRule.from_dict(r) for r in raw.get("merge", ()))
        cfg = cls(**raw)
        if cfg.hash != "sha256":
            raise UserError(f"unsupported hash {cfg.hash!r}", hint="use 'sha256'")
        if cfg.chunk_bytes < 4096 or cfg.chunk_bytes % 64:
            raise UserError("chunk_bytes must be a multiple of 64 and at least 4096")
        if not 0 <= cfg.max_delta_depth <= 64:
            raise UserError("max_delta_depth must be between 0 and 64")
        return cfg

    @classmethod
    def load(cls, worktree: Path) -> RepoConfig:
        """Settings of the repository whose top level is ``worktree`` (defaults if absent)."""
        path = worktree / CONFIG_FILE
        if not path.exists():
            return cls()
        return cls.from_json(path.read_text())
