"""Structure-aware generators of safetensors files, ``.npz`` archives, patch files and
statistics files: mostly well-formed, with hostile values where a reader must check them
(types, sizes, offsets, nesting, versions, digests), so that generated files get past the
first checks and reach the deeper ones."""

from __future__ import annotations

import io
import json
import math
import struct
import zipfile
from typing import Any

import numpy as np
from hypothesis import strategies as st

from potluck.formats.safetensors import build_header
from potluck.tensors.digests import base_digest, canonical_json, tensor_sha256

DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "BOOL": 1, "I64": 8, "F64": 8}
CODECS = ["exact_xor", "exact_sparse", "full", "lowrank", "quant", "sparse_topk", "dare", "nope"]

#: Any JSON value (huge integers, floats, unicode, nesting) — what a hostile writer can put
#: wherever a reader expects something precise.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.sampled_from([math.inf, -math.inf, 2**63, -1, 0, "", "0"])
    | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
names = st.text(max_size=10) | st.sampled_from(["w", "a.b", "x/y", ""])
#: Tensor names of files potluck writes (``__metadata__`` is reserved there).
tensor_names = names.filter(lambda n: n != "__metadata__")
shapes = st.lists(st.integers(0, 4), max_size=3)


def deep(text: str, depth: int) -> str:
    """``text`` wrapped in ``depth`` JSON arrays."""
    return "[" * depth + text + "]" * depth


@st.composite
def json_text(draw: st.DrawFn, value: object) -> str:
    """JSON of ``value``, sometimes re-spelled: nested very deeply, an over-long integer, cut."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=draw(st.booleans()))
    how = draw(st.sampled_from(["as is"] * 6 + ["deep", "bigint", "cut", "nan"]))
    if how == "deep":
        return deep(text, draw(st.sampled_from([2, 900, 3000])))
    if how == "bigint":
        return text.replace("0", "9" * 5000, 1) if "0" in text else "9" * 5000
    if how == "cut":
        return text[: draw(st.integers(0, len(text)))]
    if how == "nan":
        return text.replace("1", "NaN", 1).replace("2", "-Infinity", 1)
    return text


# ----------------------------------------------------------------------------- safetensors


@st.composite
def safetensors_files(draw: st.DrawFn) -> bytes:
    """Header + data: tensors laid out back to back, then fields, lengths and bytes edited."""
    header: dict[str, Any] = {}
    pos = 0
    for name, dtype, shape in draw(
        st.lists(st.tuples(names, st.sampled_from(sorted(DTYPES)), shapes), max_size=4)
    ):
        n = math.prod(shape) * DTYPES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5)))
    for _ in range(draw(st.integers(0, 2))):  # replace a field (or an entry) with any JSON
        if header:
            name = draw(st.sampled_from(sorted(header)))
            entry = header[name]
            if isinstance(entry, dict) and entry and draw(st.booleans()):
                entry[draw(st.sampled_from(sorted(entry)))] = draw(json_values)
            else:
                header[name] = draw(json_values)
    raw = draw(json_text(header)).encode("utf-8", "surrogatepass")
    raw += b" " * draw(st.integers(0, 7))
    length = len(raw) + draw(st.sampled_from([0, 0, 0, 1, -1, 2**40, 2**63]))
    data = bytes(max(0, pos + draw(st.sampled_from([0, 0, 0, 1, -1, -pos]))))
    return struct.pack("<Q", length % 2**64) + raw + data


# ----------------------------------------------------------------------------- npz

_DESCRS = ["<f4", "<i8", "|b1", "|u1", ">i4", "|V2", "<U3", "|O", "S5", "<c16", "f8", "zz"]


@st.composite
def npy_member(draw: st.DrawFn) -> bytes:
    """A ``.npy`` file: magic, version, a header literal (sometimes junk), data."""
    descr = draw(
        st.sampled_from(_DESCRS)
        | st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(_DESCRS)), max_size=2)
        | json_values
    )
    shape = tuple(draw(st.lists(st.integers(0, 3) | st.sampled_from([-1, 2**70]), max_size=3)))
    fortran = draw(st.booleans() | st.just("yes"))
    literal = f"{{'descr': {descr!r}, 'fortran_order': {fortran!r}, 'shape': {shape!r}, }}"
    how = draw(st.sampled_from(["ok"] * 5 + ["junk", "deep", "bigint", "set"]))
    if how == "junk":
        literal = draw(st.text(st.sampled_from("{}[]()'\":,0123456789abe x-"), max_size=60))
    elif how == "deep":
        literal = literal.replace("'shape': ", "'shape': " + "(" * 5000, 1) + ")" * 5000
    elif how == "bigint":
        literal = literal.replace("'shape': (", "'shape': (" + "9" * 5000 + ",", 1)
    elif how == "set":
        literal = "{{}: 1, []: 2}"
    body = literal.encode("latin1", "replace") + b"\n"
    version = draw(st.sampled_from([1, 1, 2, 3, 9]))
    head = b"\x93NUMPY" + bytes([version, 0])
    head += struct.pack(
        "<H" if version == 1 else "<I", len(body) + draw(st.sampled_from([0, 0, 5]))
    )
    try:
        itemsize = np.dtype(descr).itemsize if isinstance(descr, str) else 4
    except (TypeError, ValueError):
        itemsize = 4
    n = math.prod(d for d in shape if isinstance(d, int) and 0 <= d < 8) * itemsize
    return head + body + bytes(max(0, n + draw(st.sampled_from([0, 0, 0, 1, -1]))))


@st.composite
def npz_files(draw: st.DrawFn) -> bytes:
    """A zip of ``.npy`` members (stored or deflated) and stray members."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name in draw(st.lists(names, min_size=1, max_size=3, unique=True)):
            suffix = draw(st.sampled_from([".npy", ".npy", ".txt", ""]))
            method = draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
            z.writestr(zipfile.ZipInfo(name + suffix or "x"), draw(npy_member()), method)
    blob = out.getvalue()
    cut = draw(st.sampled_from([0, 0, 0, 1, 30]))
    return blob[: len(blob) - cut]


# ----------------------------------------------------------------------------- patch / stats


def _array(draw: st.DrawFn) -> np.ndarray:
    shape = tuple(draw(shapes))
    dtype = draw(st.sampled_from(["<f4", "<f2", "|i1", "|u1", "<i8"]))
    return np.arange(math.prod(shape), dtype=dtype).reshape(shape)


def _file(meta: dict[str, str], arrays: list[tuple[str, np.ndarray]], cut: int) -> bytes:
    from potluck.tensors.dtypes import from_numpy

    specs = [(n, from_numpy(a.dtype), tuple(a.shape)) for n, a in arrays]
    blob = build_header(specs, meta) + b"".join(a.tobytes() for _, a in arrays)
    return blob[: len(blob) - cut]


def _maybe(draw: st.DrawFn, valid: object) -> str:
    """Canonical JSON of ``valid``, or of any JSON value, or any text."""
    how = draw(st.sampled_from(["valid"] * 6 + ["json", "text"]))
    if how == "json":
        return draw(json_text(draw(json_values)))
    if how == "text":
        return draw(st.text(max_size=10))
    return canonical_json(valid)


@st.composite
def patch_files(draw: st.DrawFn) -> bytes:
    """Patch files (format "1") with payload arrays and metadata in every state, the digest
    usually recomputed so that the metadata parsers are reached."""
    from potluck.ops.patch.fileformat import content_digest

    arrays: list[tuple[str, np.ndarray]] = []
    tensors: dict[str, Any] = {}
    for tensor in draw(st.lists(tensor_names, max_size=3, unique=True)):
        error = draw(st.none() | st.just({"relative_error": 0.1}) | json_values)
        tensors[tensor] = {
            "codec": draw(st.sampled_from(CODECS)),
            "meta": draw(st.dictionaries(st.text(max_size=5), json_values, max_size=2)),
            "error": error,
        }
        for key in draw(st.lists(st.sampled_from(["data", "a", "b", "mask"]), unique=True)):
            arrays.append((f"{tensor}/{key}", _array(draw)))
    base = draw(st.dictionaries(names, st.text(max_size=4), max_size=2))
    meta = {
        "potluck_patch": draw(st.sampled_from(["1", "1", "1", "2", ""])),
        "added": _maybe(draw, []),
        "removed": _maybe(draw, []),
        "base": _maybe(draw, base),
        "base_digest": base_digest(base) if draw(st.booleans()) else "x",
        "result": _maybe(draw, {}),
        "tensors": _maybe(draw, tensors),
        "description": _maybe(draw, {"author": "a"}),
    }
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2, unique=True)):
        del meta[key]
    arrays.sort(key=lambda t: t[0])
    if draw(st.integers(0, 4)):
        meta["digest"] = content_digest(meta, arrays)
    return _file(dict(sorted(meta.items())), arrays, draw(st.sampled_from([0, 0, 0, 3])))


@st.composite
def stats_files(draw: st.DrawFn) -> bytes:
    """Statistics files (format "1") with float32 tensors and metadata in every state."""
    kind = draw(st.sampled_from(["fisher", "gram", "gram", "other"]))
    arrays = []
    for name in draw(st.lists(tensor_names, max_size=3, unique=True)):
        d = draw(st.integers(0, 3))
        shape = draw(st.sampled_from([(d, d), (d,), (d, d + 1)]))
        arrays.append((name, np.ones(shape, np.float32) * draw(st.sampled_from([1.0, -1.0]))))
    arrays.sort(key=lambda t: t[0])
    hashes = {n: tensor_sha256(a) for n, a in arrays}
    meta = {
        "potluck_stats": draw(st.sampled_from(["1", "1", "1", "0"])),
        "kind": kind,
        "samples": draw(st.sampled_from(["3", "x", "9" * 5000, "-1"])),
        "tokens": "5",
        "model_sha256": _maybe(draw, {}),
        "model_digest": "x",
        "data_sha256": "",
        "tensor_sha256": _maybe(draw, hashes),
        "input_axes": _maybe(draw, {n: draw(st.sampled_from([0, 1, 2])) for n, _ in arrays}),
        "fisher_norm": draw(st.sampled_from(["1.5", "nan", "x", "1e999"])),
        "description": _maybe(draw, {}),
    }
    for key in draw(st.lists(st.sampled_from(sorted(meta)), max_size=2, unique=True)):
        del meta[key]
    return _file(dict(sorted(meta.items())), arrays, draw(st.sampled_from([0, 0, 0, 3])))
