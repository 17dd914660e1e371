"""Expert versions and PEP 440-ish constraints (a simple, documented subset).

A version is dot-separated non-negative integers (``1``, ``1.2``, ``1.2.3``); missing parts count
as zero (``1.2 == 1.2.0``). A constraint is ``*`` (anything) or comma-separated clauses
``OP VERSION`` with OP in ``== != >= <= > <`` (all must hold; a bare ``1.2`` means ``==1.2``);
``==1.2.*`` matches any version starting with 1.2. A reference is ``name@constraint``
(``name`` alone means ``name@*``).
"""

from __future__ import annotations

import re

from potluck.errors import UserError

__all__ = ["Version", "matches", "parse_constraint", "parse_ref", "parse_version", "resolve"]

Version = tuple[int, ...]

_VERSION = re.compile(r"^\d+(\.\d+)*$")
_CLAUSE = re.compile(r"^(==|!=|>=|<=|>|<)?\s*(\d+(?:\.\d+)*)(\.\*)?$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def parse_version(text: str) -> Version:
    """``"1.2.3"`` → (1, 2, 3); anything else is a ``UserError``."""
    if not _VERSION.match(text):
        raise UserError(
            f"invalid version {text!r}", hint="use dot-separated integers, e.g. 1.0 or 2.1.3"
        )
    parts = [int(p) for p in text.split(".")]
    while len(parts) > 1 and parts[-1] == 0:
        parts.pop()
    return tuple(parts)


def _pad(v: Version, n: int) -> Version:
    return v + (0,) * (n - len(v))


def _cmp(a: Version, b: Version) -> int:
    n = max(len(a), len(b))
    pa, pb = _pad(a, n), _pad(b, n)
    return (pa > pb) - (pa < pb)


Clause = tuple[str, Version, bool]


def parse_constraint(text: str) -> list[Clause]:
    """Parse a constraint into (op, version, prefix) clauses; ``*`` gives no clauses."""
    text = text.strip()
    if text in ("", "*"):
        return []
    out: list[Clause] = []
    for part in text.split(","):
        m = _CLAUSE.match(part.strip())
        if m is None or (m.group(3) and m.group(1) not in (None, "==", "!=")):
            raise UserError(
                f"invalid version constraint {part.strip()!r} in {text!r}",
                hint="use *, ==1.2, ==1.*, !=1.3, >=1.0,<2 (comma = and)",
            )
        out.append(
            (m.group(1) or "==", tuple(int(p) for p in m.group(2).split(".")), bool(m.group(3)))
        )
    return out


def _holds(v: Version, clause: Clause) -> bool:
    op, want, prefix = clause
    if prefix:
        same = _pad(v, len(want))[: len(want)] == want
        return same if op == "==" else not same
    c = _cmp(v, want)
    return {"==": c == 0, "!=": c != 0, ">=": c >= 0, "<=": c <= 0, ">": c > 0, "<": c < 0}[op]


def matches(version: str, constraint: str) -> bool:
    """Whether ``version`` satisfies ``constraint``."""
    v = parse_version(version)
    return all(_holds(v, c) for c in parse_constraint(constraint))


def parse_ref(ref: str) -> tuple[str, str]:
    """``"name@>=1,<2"`` → (name, constraint); a bare name means any version."""
    name, _, constraint = ref.partition("@")
    name = name.strip()
    if not _NAME.match(name):
        raise UserError(
            f"invalid expert name {name!r} in {ref!r}",
            hint="names use letters, digits, '.', '_' and '-'",
        )
    constraint = constraint.strip() or "*"
    parse_constraint(constraint)
    return name, constraint


def resolve(name: str, constraint: str, available: list[str]) -> str:
    """The highest of ``available`` versions satisfying ``constraint``; else a ``UserError``."""
    ok = [v for v in available if matches(v, constraint)]
    if not ok:
        raise UserError(
            f"no version of expert {name!r} satisfies {constraint!r}",
            hint=f"available: {', '.join(sorted(available, key=parse_version)) or '(none)'}",
            expert=name,
        )
    return max(ok, key=lambda v: _pad(parse_version(v), 8))
