"""Read and edit the top-level ``.gitattributes`` lines that route files through potluck.

Only lines potluck adds or removes are touched; every other line (comments, other filters,
``git lfs track`` lines, CRLF endings) is kept byte for byte. Patterns containing whitespace
are written C-quoted (``"my model.bin" filter=potluck …``), which git understands.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from potluck.errors import UserError

DEFAULT_ATTRS = "filter=potluck diff=potluck merge=potluck -text"
FILENAME = ".gitattributes"
_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v"}


def quote_pattern(pattern: str) -> str:
    """``pattern`` as it must be written in a gitattributes line; ``UserError`` if impossible."""
    if not pattern.strip():
        raise UserError("empty pattern", hint="give a glob such as '*.safetensors'")
    if any(ord(c) < 0x20 or c == "\x7f" for c in pattern):
        raise UserError(
            f"pattern {pattern!r} contains a control character",
            hint="use '?' or '*' to match such characters",
        )
    if pattern.startswith("!"):
        raise UserError(
            f"negative pattern {pattern!r} is not allowed in .gitattributes",
            hint="track a narrower pattern instead, or untrack the pattern",
        )
    if any(c.isspace() for c in pattern) or pattern[0] in '"#':
        return '"' + pattern.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return pattern


def _unquote(text: str) -> tuple[str, str] | None:
    """Parse a C-quoted string at the start of ``text``: (value, rest) or None if malformed."""
    out: list[str] = []
    i = 1
    while i < len(text):
        c = text[i]
        if c == '"':
            return "".join(out), text[i + 1 :]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        nxt = text[i + 1 : i + 2]
        if nxt in _ESCAPES:
            out.append(_ESCAPES[nxt])
            i += 2
        elif nxt[:1].isdigit() and len(text) >= i + 4:
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        elif nxt:
            out.append(nxt)
            i += 2
        else:
            return None
    return None


def parse_line(line: str) -> tuple[str, list[str]] | None:
    """``(pattern, attributes)`` of one gitattributes line; None for blanks/comments/macros."""
    text = line.strip()
    if not text or text.startswith("#") or text.startswith("[attr]"):
        return None
    if text.startswith('"'):
        parsed = _unquote(text)
        if parsed is None:
            return None
        pattern, rest = parsed
        return pattern, rest.split()
    pattern, *attrs = text.split()
    return pattern, attrs


def _filter_state(attrs: list[str]) -> str | None:
    """What a line says about the ``filter`` attribute: a driver name, ``""`` (unset), None."""
    state: str | None = None
    for attr in attrs:
        if attr.startswith("filter="):
            state = attr.removeprefix("filter=")
        elif attr in ("-filter", "!filter", "filter"):
            state = ""
    return state


def _filter_name(attrs: str) -> str:
    state = _filter_state(attrs.split())
    if not state:
        raise ValueError(f"attributes {attrs!r} do not set filter=NAME")
    return state


def _read(worktree: Path) -> str:
    path = Path(worktree) / FILENAME
    if not path.exists():
        return ""
    return path.read_bytes().decode("utf-8", "surrogateescape")


def _write(worktree: Path, text: str) -> None:
    (Path(worktree) / FILENAME).write_bytes(text.encode("utf-8", "surrogateescape"))


def tracked_patterns(worktree: Path, filter_name: str = "potluck") -> list[str]:
    """Patterns of ``worktree/.gitattributes`` whose last filter setting is ``filter_name``."""
    state: dict[str, str] = {}
    for line in _read(worktree).splitlines():
        parsed = parse_line(line)
        if parsed is None:
            continue
        pattern, attrs = parsed
        value = _filter_state(attrs)
        if value is not None:
            state.pop(pattern, None)  # keep the order of the last mention
            state[pattern] = value
    return [p for p, v in state.items() if v == filter_name]


def add_patterns(worktree: Path, patterns: Iterable[str], attrs: str = DEFAULT_ATTRS) -> list[str]:
    """Append ``PATTERN attrs`` for each pattern not tracked yet; return the patterns added."""
    name = _filter_name(attrs)
    tracked = set(tracked_patterns(worktree, name))
    added: list[str] = []
    lines: list[str] = []
    for pattern in patterns:
        quoted = quote_pattern(pattern)
        if pattern in tracked or pattern in added:
            continue
        added.append(pattern)
        lines.append(f"{quoted} {attrs}")
    if not lines:
        return []
    text = _read(worktree)
    newline = "\r\n" if "\r\n" in text else "\n"
    if text and not text.endswith("\n"):
        text += newline
    _write(worktree, text + "".join(line + newline for line in lines))
    return added


def rewrite_filter(
    worktree: Path, patterns: Iterable[str], from_filter: str, attrs: str = DEFAULT_ATTRS
) -> list[str]:
    """Turn the lines routing ``patterns`` through ``from_filter`` (e.g. git-lfs' ``lfs``) into
    ``PATTERN attrs`` in place; return the patterns rewritten.

    The first such line of a pattern is replaced (same position, same line ending); later
    ones, and all of them when ``attrs``' filter already tracks the pattern, are dropped, so
    the pattern ends up with exactly one line for the new filter.
    """
    wanted = set(patterns)
    tracked = set(tracked_patterns(worktree, _filter_name(attrs)))
    rewritten: list[str] = []
    out: list[str] = []
    for line in _read(worktree).splitlines(keepends=True):
        parsed = parse_line(line)
        if parsed is None or parsed[0] not in wanted or _filter_state(parsed[1]) != from_filter:
            out.append(line)
            continue
        pattern = parsed[0]
        if pattern not in tracked and pattern not in rewritten:
            ending = line[len(line.rstrip("\r\n")) :]
            out.append(f"{quote_pattern(pattern)} {attrs}{ending}")
        if pattern not in rewritten:
            rewritten.append(pattern)
    if rewritten:
        _write(worktree, "".join(out))
    return rewritten


def remove_patterns(
    worktree: Path, patterns: Iterable[str], filter_name: str = "potluck"
) -> list[str]:
    """Delete the lines routing ``patterns`` through ``filter_name``; return those removed."""
    wanted = set(patterns)
    removed: list[str] = []
    kept: list[str] = []
    for line in _read(worktree).splitlines(keepends=True):
        parsed = parse_line(line)
        if parsed is not None and parsed[0] in wanted and _filter_state(parsed[1]) == filter_name:
            if parsed[0] not in removed:
                removed.append(parsed[0])
            continue
        kept.append(line)
    if removed:
        _write(worktree, "".join(kept))
    return removed
