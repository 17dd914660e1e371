"""Human and JSON rendering: the only place that formats output for people.

Every line meant for a person (stdout, stderr, log records, error messages) leaves through
``echo``/``err``, which make untrusted text safe for a terminal (``safe_text``): control
characters, C1 codes, bidi overrides and undecodable bytes are shown as escapes, and the
passwords and tokens of URLs are replaced by ``***`` (``redact``). Single fields inside a
layout (tensor names, paths in tables and diffs) go through ``safe_field``, which escapes
newlines and tabs too. JSON output stays exact JSON: ``json.dumps`` escapes control
characters itself; only URL secrets are redacted.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from potluck.git.inspect import FileDiff
    from potluck.objects.manifest import Manifest

#: C0 controls but newline and tab, DEL, C1 controls, bidi controls, line/paragraph
#: separators, and lone surrogates (bytes of a path that are not UTF-8).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e"
                     "\u2066-\u2069\ud800-\udfff]")  # fmt: skip
_UNSAFE_FIELD = re.compile(f"[\\n\\t{_UNSAFE.pattern[1:-1]}]")
#: ``scheme://user:password@`` (the password is redacted) and ``http(s)://token@``.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^\s/@:?#]*):[^\s/]*@")
_HTTP_USER = re.compile(r"(?P<scheme>\bhttps?://)[^\s/@:?#]+@", re.IGNORECASE)
#: Query parameters whose values are secrets (``?token=…``, S3/GCS/Azure signatures).
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&][A-Za-z0-9_.-]*(?:token|secret|passw(?:or)?d|pwd|sig|signature|credential|"
    r"key|auth)[A-Za-z0-9_.-]*=)[^&#\s\"'<>]+",
    re.IGNORECASE,
)


_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def redact(text: str) -> str:
    """``text`` with URL passwords, ``https://TOKEN@`` user names and secret query values
    replaced by ``***`` (``http://user:***@host/…?token=***``)."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    text = _HTTP_USER.sub(r"\g<scheme>***@", text)
    return _SECRET_PARAM.sub(r"\g<key>***", text)


def safe_text(text: str) -> str:
    """``text`` made safe to print on a terminal: control characters (but newline and tab),
    C1 codes, bidi overrides and undecodable bytes become ``\\r``, ``\\xNN`` or ``\\uNNNN``,
    and URL secrets are redacted."""
    return redact(_UNSAFE.sub(_escape_char, text))


def safe_field(text: object) -> str:
    """One value inside a layout (a name, a path): like ``safe_text``, and newlines and tabs
    are escaped too, so a value can never start a line of its own."""
    text = str(text)
    if _is_plain(text):
        return text  # nothing to escape or redact (most tensor names)
    return redact(_UNSAFE_FIELD.sub(_escape_char, text))


def _is_plain(text: str) -> bool:
    """Whether ``safe_field`` leaves ``text`` as it is (printable ASCII, nothing to redact)."""
    return text.isascii() and text.isprintable() and "://" not in text and "=" not in text


def echo(text: object = "", *, err: bool = False) -> None:
    """Print one human-readable message (stdout, or stderr with ``err``) through
    ``safe_text``."""
    import click

    click.echo(safe_text(str(text)), err=err)


def secho(text: object, *, err: bool = False, **style: Any) -> None:
    """``echo`` with click's colours and styles (``fg=``, ``bold=``…)."""
    import click

    click.secho(safe_text(str(text)), err=err, **style)


def err(msg: str) -> None:
    """Print to stderr (through ``safe_text``)."""
    print(safe_text(msg), file=sys.stderr)


def configure_logging(verbose: int, quiet: bool) -> None:
    """Log records to stderr through ``SafeFormatter`` (``potluck: message``): errors only
    when ``quiet``, else warnings, ``verbose`` 1 info, 2 debug."""
    level = (
        logging.ERROR
        if quiet
        else (logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING)
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("potluck: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


class SafeFormatter(logging.Formatter):
    """A log formatter whose records go through ``safe_text``; string arguments (paths,
    tensor names) go through ``safe_field``, so a newline in one cannot start a line."""

    def format(self, record: logging.LogRecord) -> str:
        if isinstance(record.args, tuple):
            record.args = tuple(safe_field(a) if isinstance(a, str) else a for a in record.args)
        return safe_text(super().format(record))


def _redacted(obj: Any) -> Any:
    """``obj`` with every string value (and key) passed through ``redact``."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {_redacted(k): _redacted(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_redacted(v) for v in obj]
    return obj


def emit_json(obj: Any) -> None:
    """Print ``obj`` as JSON on stdout (URL secrets redacted; ``json`` escapes the rest)."""
    import click

    click.echo(json.dumps(_redacted(obj), indent=2, sort_keys=True, default=str))


def human_bytes(n: float) -> str:
    """1536 → '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain left-aligned text table (every cell through ``safe_field``)."""
    rows = [[safe_field(c) for c in r] for r in rows]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def file_diff_text(d: FileDiff) -> str:
    """Text of one file's tensor-level diff (used by `potluck diff` and the git diff driver)."""
    path = safe_field(d.path)
    out = [f"potluck diff a/{path} b/{path}"]
    for c in d.changes:
        sig = {"added": c.new, "removed": c.old}.get(c.status) or f"{c.old} -> {c.new}"
        if c.status == "changed" and c.old == c.new:
            sig = c.new or ""
        line = f"  {c.status:<8} {safe_field(c.name)}  {safe_field(sig)}"
        if c.stats is not None:
            s = c.stats
            line += (
                f"  ‖Δ‖₂={s.l2:.4g} ‖Δ‖/‖W‖={s.rel:.3g} changed={100 * s.frac_changed:.2f}%"
                f" max|Δ|={s.max_abs:.3g}"
            )
        out.append(line)
    out.append(f"  ({len(d.changes)} tensors differ, {d.unchanged} unchanged)")
    return "\n".join(out)


def textconv_text(m: Manifest) -> bytes:
    """What ``potluck textconv`` prints for a manifest (``tensor_lines``, made safe), as the
    bytes git's textconv cache keeps."""
    return (safe_text(tensor_lines(m)) + "\n").encode("utf-8")


def echo_textconv(m: Manifest) -> None:
    """Print ``textconv_text(m)`` (the same bytes git's textconv cache keeps)."""
    sys.stdout.flush()
    sys.stdout.buffer.write(textconv_text(m))
    sys.stdout.buffer.flush()


def _all_plain(fields: list[str]) -> bool:
    """Whether ``safe_field`` leaves every one of ``fields`` as it is: checked on them joined by
    a space, which no escape or redaction rule can match across."""
    return _is_plain(" ".join(fields))


def _tensor_rows(m: Manifest) -> list[str]:
    """``name  dtype[shape]  oid-prefix`` of each tensor, by name (every field made safe: one
    check for all of them when none needs it, as in most files)."""
    tensors = m.tensors()
    names = sorted(tensors)
    entries = [tensors[name] for name in names]
    prefixes = [e.oid[:16] for e in entries]
    plain = _all_plain(names) and _all_plain([e.dtype for e in entries]) and _all_plain(prefixes)
    if not plain:
        f = safe_field
        return [
            f"{f(name)}  {f(e.dtype)}[{','.join(map(str, e.shape))}]  {f(prefix)}"
            for name, e, prefix in zip(names, entries, prefixes, strict=True)
        ]
    return [
        f"{name}  {e.dtype}[{','.join(map(str, e.shape))}]  {prefix}"
        for name, e, prefix in zip(names, entries, prefixes, strict=True)
    ]


def tensor_lines(m: Manifest | None) -> str:
    """Text form of a manifest for line diffs: ``name  dtype[shape]  oid-prefix`` per tensor."""
    if m is None:
        return ""
    f = safe_field
    lines = [f"# {f(m.format)}, {m.size} bytes", *_tensor_rows(m)]
    for v in sorted(m.views, key=lambda v: v.name):
        shape = ",".join(map(str, v.shape))
        lines.append(f"{f(v.name)}  {f(v.dtype)}[{shape}]  view of {f(v.storage)}")
    return "\n".join(lines)
