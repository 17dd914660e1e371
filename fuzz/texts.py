"""Structure-aware generators of potluck's text formats and of what remotes send: manifests,
wire indexes and Git LFS batch responses."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import strategies as st

from fuzz.files import json_text, json_values, names, shapes

oids = st.binary(min_size=1, max_size=4).map(lambda b: hashlib.sha256(b).hexdigest())
#: An object id, or something in its place.
oid_like = oids | st.sampled_from(["", "-", "0" * 63, "A" * 64, "g" * 64]) | st.text(max_size=5)
sizes = st.integers(0, 100) | st.sampled_from([-1, 2**63, 2**70])

# ----------------------------------------------------------------------------- manifests

_KEYS = ["raw", "size", "tensor", "dtype", "shape", "oid", "view", "storage", "stride", "offset"]


@st.composite
def _records(draw: st.DrawFn) -> tuple[list[dict[str, Any]], int]:
    records: list[dict[str, Any]] = []
    total = 0
    for kind in draw(st.lists(st.sampled_from(["raw", "tensor"]), max_size=4)):
        size = draw(st.integers(0, 64))
        total += size
        if kind == "raw":
            records.append({"raw": draw(oids), "size": size})
        else:
            name = draw(names)
            shape = draw(shapes)
            records.append(
                {"tensor": name, "dtype": "U8", "shape": shape, "oid": draw(oids), "size": size}
            )
    for name in draw(st.lists(names, max_size=2, unique=True)):
        records.append(
            {
                "view": name,
                "storage": "storage:0",
                "dtype": "F32",
                "shape": draw(shapes),
                "stride": draw(shapes),
                "offset": draw(st.integers(0, 4)),
            }
        )
    return records, total


@st.composite
def manifests(draw: st.DrawFn) -> bytes:
    """Canonical manifests, then a record or its fields replaced, a line cut, bytes flipped."""
    records, total = draw(_records())
    head: dict[str, Any] = {"format": "safetensors", "size": total, "metadata": {}}
    if draw(st.booleans()):
        head["metadata"] = draw(st.dictionaries(st.text(max_size=4), st.text(max_size=4)))
    rows: list[object] = [head, *records]
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(rows) - 1))
        row = rows[i]
        if isinstance(row, dict) and row and draw(st.booleans()):
            row[draw(st.sampled_from(sorted(row)) | st.sampled_from(_KEYS))] = draw(json_values)
        else:
            rows[i] = draw(json_values)
    lines = ["potluck manifest v1"]
    lines += [draw(json_text(r)) if draw(st.integers(0, 3)) == 0 else _canon(r) for r in rows]
    text = "\n".join(lines) + "\n"
    how = draw(st.sampled_from(["as is"] * 5 + ["cut", "crlf", "byte"]))
    data = text.encode("utf-8", "surrogatepass")
    if how == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif how == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif how == "byte":
        i = draw(st.integers(0, len(data) - 1))
        data = data[:i] + bytes([draw(st.integers(0, 255))]) + data[i + 1 :]
    return data


def _canon(row: object) -> str:
    return json.dumps(row, separators=(",", ":"), ensure_ascii=True)


# ----------------------------------------------------------------------------- wire index


@st.composite
def wire_indexes(draw: st.DrawFn) -> bytes:
    """``potluck wire index v1`` and lines of four fields, some of them wrong."""
    lines = []
    for _ in range(draw(st.integers(0, 4))):
        fields = [draw(oid_like), draw(oid_like), str(draw(sizes)), draw(oid_like | st.just("-"))]
        if draw(st.integers(0, 3)) == 0:
            fields = draw(st.lists(st.text(max_size=6), max_size=6))
        lines.append(" ".join(fields))
    magic = draw(st.sampled_from(["potluck wire index v1\n"] * 5 + ["potluck wire index v2\n"]))
    return (magic + "\n".join(lines) + "\n").encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- LFS batch


@st.composite
def _action(draw: st.DrawFn) -> object:
    action: dict[str, Any] = {"href": draw(st.sampled_from(["http://x/o", ""]) | json_values)}
    if draw(st.booleans()):
        action["header"] = draw(st.dictionaries(st.text(max_size=4), json_values) | json_values)
    if draw(st.booleans()):
        action["expires_in"] = draw(st.integers(-5, 2**70) | st.floats() | json_values)
    if draw(st.booleans()):
        stamps = ["2030-01-01T00:00:00Z", "0001-01-01T00:00:00Z", "9999-12-31T23:59:59+14:00"]
        action["expires_at"] = draw(st.sampled_from(stamps) | json_values)
    return action


@st.composite
def lfs_batches(draw: st.DrawFn) -> tuple[bytes, list[tuple[str, int]]]:
    """A batch response (JSON bytes) for the refs asked for, and those refs."""
    refs = draw(st.lists(st.tuples(oids, st.integers(0, 10)), max_size=3, unique=True))
    objects: list[object] = []
    for oid, size in refs:
        obj: dict[str, Any] = {"oid": oid, "size": size}
        if draw(st.integers(0, 3)) == 0:
            obj["error"] = draw(
                st.fixed_dictionaries({"code": json_values, "message": json_values}) | json_values
            )
        else:
            kinds = st.sampled_from(["download", "upload", "verify"])
            obj["actions"] = draw(st.dictionaries(kinds, _action()) | json_values)
        if draw(st.integers(0, 4)) == 0:
            obj[draw(st.sampled_from(["oid", "size", "actions"]))] = draw(json_values)
        objects.append(obj if draw(st.integers(0, 6)) else draw(json_values))
    body: dict[str, Any] = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
    if draw(st.integers(0, 3)) == 0:
        body[draw(st.sampled_from(sorted(body)))] = draw(json_values)
    text = draw(json_text(body)) if draw(st.integers(0, 3)) == 0 else json.dumps(body)
    return text.encode("utf-8", "surrogatepass"), refs
