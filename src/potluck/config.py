"""Repository settings that decide object identity and storage. Frozen; passed explicitly."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from potluck.errors import UserError

CONFIG_FILE = ".potluck.json"
#: Bounds of the numeric settings (inclusive). ``chunk_bytes`` bounds the memory of every
#: read and write (a few chunks per worker), so it is capped at 256 MiB.
MIN_CHUNK_BYTES = 4096
MAX_CHUNK_BYTES = 256 << 20
MAX_DELTA_DEPTH = 64
ZSTD_LEVELS = (1, 22)
HASHES = ("sha256",)
FORMAT_VERSIONS = (1,)


class ConfigError(UserError):
    """``.potluck.json`` is not valid: names the file, the key and the offending value."""


def _kind(value: Any) -> str:
    """How a JSON value is described in messages: ``the string "4096"``."""
    kinds = {bool: "the boolean", int: "the integer", float: "the number", str: "the string",
             list: "an array", dict: "an object", type(None): "null"}  # fmt: skip
    kind = kinds.get(type(value), type(value).__name__)
    if isinstance(value, list | dict) or value is None:
        return kind
    return f"{kind} {json.dumps(value)}"


def _bad(where: str, key: str, value: Any, want: str, hint: str | None = None) -> ConfigError:
    """The error for ``key`` holding ``value`` where ``want`` was expected."""
    return ConfigError(
        f"{where}: {key} must be {want}, not {_kind(value)}",
        hint=hint or f"fix {key} in {where} (or delete the key to use the default)",
        file=where, key=key, value=value,
    )  # fmt: skip


def _int(where: str, key: str, value: Any, lo: int, hi: int) -> int:
    """``value`` when it is an integer in ``[lo, hi]`` (booleans are not integers)."""
    if type(value) is not int or not lo <= value <= hi:
        raise _bad(where, key, value, f"an integer from {lo} to {hi}")
    return value


def _str(where: str, key: str, value: Any, choices: tuple[str, ...] | None = None) -> str:
    """``value`` when it is a string (one of ``choices`` when given)."""
    if not isinstance(value, str) or (choices is not None and value not in choices):
        want = "a string" if choices is None else " or ".join(json.dumps(c) for c in choices)
        raise _bad(where, key, value, want)
    return value


def _object(where: str, key: str, value: Any, known: set[str]) -> dict[str, Any]:
    """``value`` when it is a JSON object whose keys are all in ``known``."""
    if not isinstance(value, dict):
        raise _bad(where, key, value, "an object")
    unknown = sorted(set(value) - known)
    if unknown:
        raise ConfigError(
            f"{where}: {key} has unknown keys {unknown}",
            hint=f"known keys: {sorted(known)} (an unknown key may be a typo, or a setting of a "
            "newer potluck: it is refused rather than ignored because settings decide how "
            "objects are stored)",
            file=where, key=key, value=unknown,
        )  # fmt: skip
    return value


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
    def from_dict(cls, raw: Any, where: str = CONFIG_FILE, key: str = "merge[0]") -> MergeRule:
        """Parse one rule (``key`` names it in errors), refusing unknown keys and bad types."""
        known = {f.name for f in fields(cls)}
        rule = _object(where, key, raw, known)
        params = rule.get("params", {})
        if not isinstance(params, dict):  # its keys are the method's (checked by the method)
            raise _bad(where, f"{key}.params", params, "an object")
        return cls(
            path=_str(where, f"{key}.path", rule.get("path", "*")),
            tensors=_str(where, f"{key}.tensors", rule.get("tensors", "*")),
            method=_str(where, f"{key}.method", rule.get("method", "conflict")),
            params=dict(params),
            seed=_int(where, f"{key}.seed", rule.get("seed", 0), 0, 2**63 - 1),
        )


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
    def from_json(cls, text: str, where: str = CONFIG_FILE) -> RepoConfig:
        """Parse settings (``where`` names the file in errors), refusing unknown keys and bad
        values with a ``ConfigError`` naming the key and the value."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(
                f"{where} is not valid JSON: {e}", hint="fix or delete it", file=where
            ) from e
        doc = _object(where, "the top level", raw, {f.name for f in fields(cls)})
        return cls(**_check_settings(where, doc))

    @classmethod
    def load(cls, worktree: Path) -> RepoConfig:
        """Settings of the repository whose top level is ``worktree`` (defaults if absent)."""
        path = worktree / CONFIG_FILE
        if not path.exists():
            return cls()
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"cannot read {path}: {e}",
                hint="make it a UTF-8 JSON file, or delete it",
                file=path,
            ) from e
        return cls.from_json(text, str(path))


def _check_settings(where: str, doc: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``RepoConfig`` for the settings object ``doc``, each checked."""
    checks: dict[str, Callable[[Any], Any]] = {
        "format_version": lambda v: _int(where, "format_version", v, *_span(FORMAT_VERSIONS)),
        "hash": lambda v: _hash(where, v),
        "max_delta_depth": lambda v: _int(where, "max_delta_depth", v, 0, MAX_DELTA_DEPTH),
        "chunk_bytes": lambda v: _chunk_bytes(where, v),
        "zstd_level": lambda v: _int(where, "zstd_level", v, *ZSTD_LEVELS),
        "merge": lambda v: _merge_rules(where, v),
    }
    return {key: checks[key](value) for key, value in doc.items()}


def _span(values: tuple[int, ...]) -> tuple[int, int]:
    return min(values), max(values)


def _hash(where: str, value: Any) -> str:
    name = _str(where, "hash", value)
    if name not in HASHES:
        raise ConfigError(
            f"{where}: unsupported hash {name!r}",
            hint=f"use {' or '.join(map(repr, HASHES))}", file=where, key="hash", value=value,
        )  # fmt: skip
    return name


def _chunk_bytes(where: str, value: Any) -> int:
    want = f"a multiple of 64 and at least {MIN_CHUNK_BYTES}, at most {MAX_CHUNK_BYTES}"
    if type(value) is not int or value % 64 or not MIN_CHUNK_BYTES <= value <= MAX_CHUNK_BYTES:
        raise _bad(where, "chunk_bytes", value, want)
    return value


def _merge_rules(where: str, value: Any) -> tuple[MergeRule, ...]:
    if not isinstance(value, list):
        raise _bad(where, "merge", value, "an array of merge rules")
    return tuple(MergeRule.from_dict(r, where, f"merge[{i}]") for i, r in enumerate(value))
