"""Structure-aware generation of ``torch.save`` pickles and archives, without torch.

A hypothesis strategy builds an abstract object tree (containers, scalars, tensors over
storages, references to earlier objects, calls of allowlisted and forbidden globals, ``BUILD``s,
sets); ``compile_pickle`` turns it into protocol-2 opcodes the way ``torch.save`` writes them
(every object memoized, a reference is a ``BINGET``), then a list of opcode-level edits is
applied (deleted, duplicated and inserted opcodes). ``archive`` wraps a pickle into the zip
``torch.save`` writes, with one stored member per storage the pickle names.
"""

from __future__ import annotations

import io
import struct
import zipfile
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

#: Storage classes and their item sizes (see potluck.formats.pickle_safe.STORAGE_DTYPES).
STORAGES = {
    "FloatStorage": 4,
    "DoubleStorage": 8,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "UntypedStorage": 1,
}
GLOBALS = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch", "Size"),
    ("torch", "device"),
    ("torch", "float32"),
    ("torch", "FloatStorage"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "complex"),
    ("_codecs", "encode"),
    ("os", "system"),
    ("builtins", "eval"),
    ("torch", "Tensor"),
    ("", ""),
]

Node = tuple[Any, ...]


@dataclass
class Program:
    """Opcodes being emitted, the memo slots used so far, and the storages named."""

    out: list[bytes] = field(default_factory=list)
    memo: int = 0
    storages: dict[str, tuple[str, int]] = field(default_factory=dict)

    def put(self) -> None:
        """Memoize the top of the stack (``BINPUT``/``LONG_BINPUT``), as torch.save does."""
        n = self.memo
        self.out.append(b"q" + bytes([n]) if n < 256 else b"r" + struct.pack("<I", n))
        self.memo += 1

    def get(self, k: int) -> None:
        if not self.memo:
            self.out.append(b"N")
            return
        n = k % self.memo
        self.out.append(b"h" + bytes([n]) if n < 256 else b"j" + struct.pack("<I", n))


def _scalar(p: Program, v: object) -> None:
    if v is None:
        p.out.append(b"N")
    elif isinstance(v, bool):
        p.out.append(b"\x88" if v else b"\x89")
    elif isinstance(v, int):
        if 0 <= v < 256:
            p.out.append(b"K" + bytes([v]))
        elif -(2**31) <= v < 2**31:
            p.out.append(b"J" + struct.pack("<i", v))
        else:
            raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            p.out.append(b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"N")
    elif isinstance(v, float):
        p.out.append(b"G" + struct.pack(">d", v))
    elif isinstance(v, str):
        raw = v.encode("utf-8", "surrogatepass")
        p.out.append(b"X" + struct.pack("<I", len(raw)) + raw)
        p.put()
    elif isinstance(v, bytes):
        p.out.append(b"C" + bytes([len(v)]) + v if len(v) < 256 else b"N")
    else:
        raise TypeError(type(v))


def _global(p: Program, module: str, name: str) -> None:
    p.out.append(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
    p.put()


def _items(p: Program, items: list[Node]) -> None:
    for item in items:
        emit(p, item)


def _tensor(p: Program, node: Node) -> None:
    _, key, cls, numel, offset, shape, stride, v3 = node
    _global(p, "torch._utils", "_rebuild_tensor_v3" if v3 else "_rebuild_tensor_v2")
    p.out.append(b"((")
    _scalar(p, "storage")
    _global(p, "torch", cls)
    _scalar(p, key)
    _scalar(p, "cpu")
    _scalar(p, numel)
    p.out.append(b"t")
    p.put()
    p.out.append(b"Q")
    _scalar(p, offset)
    for dims in (shape, stride):
        p.out.append(b"(")
        for d in dims:
            _scalar(p, d)
        p.out.append(b"t")
        p.put()
    p.out.append(b"\x89")
    if v3:
        p.out.append(b"N")
        _global(p, "torch", "float32")
    else:
        _global(p, "collections", "OrderedDict")
        p.out.append(b")R")
        p.put()
    p.out.append(b"tR")
    p.put()
    p.storages.setdefault(key, (cls, numel))


def emit(p: Program, node: Node) -> None:
    """Append the opcodes that build ``node``."""
    kind = node[0]
    if kind == "scalar":
        _scalar(p, node[1])
    elif kind == "tensor":
        _tensor(p, node)
    elif kind == "ref":
        p.get(node[1])
    elif kind == "list":
        p.out.append(b"]")
        p.put()
        if node[1]:
            p.out.append(b"(")
            _items(p, node[1])
            p.out.append(b"e")
    elif kind == "tuple":
        p.out.append(b"(")
        _items(p, node[1])
        p.out.append(b"t")
        p.put()
    elif kind in ("dict", "odict"):
        if kind == "odict":
            _global(p, "collections", "OrderedDict")
            p.out.append(b")R")
        else:
            p.out.append(b"}")
        p.put()
        if node[1]:
            p.out.append(b"(")
            for k, v in node[1]:
                emit(p, k)
                emit(p, v)
            p.out.append(b"u")
    elif kind == "call":
        _global(p, *node[1])
        emit(p, ("tuple", node[2]))
        p.out.append(b"R")
        p.put()
    elif kind == "build":
        emit(p, node[1])
        emit(p, node[2])
        p.out.append(b"b")
    elif kind == "frozenset":
        p.out.append(b"\x80\x04(")  # a protocol-4 opcode inside: readers must cope
        _items(p, node[1])
        p.out.append(b"\x91")
        p.put()
    else:
        raise ValueError(kind)


def compile_pickle(root: Node, edits: list[tuple[int, bytes | None]]) -> tuple[bytes, Program]:
    """Protocol-2 pickle of ``root`` with ``edits`` applied: ``(position, opcode)`` inserts an
    opcode before the position-th one, ``(position, None)`` deletes it."""
    p = Program()
    emit(p, root)
    ops = p.out
    for pos, op in edits:
        i = pos % (len(ops) + 1)
        if op is None:
            del ops[i : i + 1]
        else:
            ops.insert(i, op)
    return b"\x80\x02" + b"".join(ops) + b".", p


# ----------------------------------------------------------------------------- strategies

_names = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(["weight", "0", ""])
_ints = st.integers(0, 8) | st.integers(-(2**70), 2**70)
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    _ints,
    st.floats(allow_nan=True),
    _names,
    st.binary(max_size=8),
).map(lambda v: ("scalar", v))
_dims = st.lists(st.integers(0, 5) | st.sampled_from([0, 1, 2**40, 2**63, -1]), max_size=4)

tensors = st.builds(
    lambda key, cls, numel, offset, shape, stride, v3: (
        "tensor",
        key,
        cls,
        numel,
        offset,
        shape,
        stride,
        v3,
    ),
    st.sampled_from(["0", "1", "2"]) | _names,
    st.sampled_from(sorted(STORAGES)) | st.just("Bogus"),
    st.integers(0, 64) | st.sampled_from([2**40, -1]),
    st.integers(0, 8) | st.just(2**62),
    _dims,
    _dims,
    st.booleans(),
)
_leaves = _scalars | tensors | st.builds(lambda k: ("ref", k), st.integers(0, 1000))


def _containers(children: st.SearchStrategy[Node]) -> st.SearchStrategy[Node]:
    keys = _scalars | st.builds(lambda k: ("ref", k), st.integers(0, 1000))
    pairs = st.lists(st.tuples(keys, children), max_size=4)
    return st.one_of(
        st.builds(lambda xs: ("list", xs), st.lists(children, max_size=4)),
        st.builds(lambda xs: ("tuple", xs), st.lists(children, max_size=4)),
        st.builds(lambda xs: ("dict", xs), pairs),
        st.builds(lambda xs: ("odict", xs), pairs),
        st.builds(
            lambda g, a: ("call", g, a), st.sampled_from(GLOBALS), st.lists(children, max_size=3)
        ),
        st.builds(lambda a, b: ("build", a, b), children, children),
        st.builds(lambda xs: ("frozenset", xs), st.lists(children, max_size=3)),
    )


trees = st.recursive(_leaves, _containers, max_leaves=24)

#: Opcodes inserted by edits: every kind the unpickler has, with small arguments.
_OPCODES = [
    b"(", b")", b"]", b"}", b"N", b"t", b"R", b"b", b"s", b"u", b"e", b"a", b"0", b"1", b"2",
    b"\x85", b"\x86", b"\x87", b"\x88", b"\x89", b"\x8f", b"\x90", b"\x91", b"\x93", b"\x94",
    b"Q", b"K\x01", b"h\x00", b"h\x07", b"q\x00", b"r\xff\xff\xff\xff", b"j\xff\xff\xff\x7f",
    b"\x95\xff\xff\xff\xff\xff\xff\xff\x7f", b"X\xff\xff\xff\x7f", b"\x8b\xff\xff\xff\x7f",
    b"ctorch\nFloatStorage\n", b"cbuiltins\nset\n", b"cos\nsystem\n", b"P0\n", b"I1\n",
    b"L" + b"9" * 5000 + b"L\n", b"\x96\x00\x00\x00\x00\x00\x00\x00\x00", b"\x97", b"\x98",
    b"\x82\x01", b"\x92", b"\x81", b".",
]  # fmt: skip
edits = st.lists(
    st.tuples(st.integers(0, 10_000), st.none() | st.sampled_from(_OPCODES)), max_size=4
)


def archive(data_pkl: bytes, storages: dict[str, tuple[str, int]], *, skew: int = 0) -> bytes:
    """A ``torch.save`` zip: ``archive/data.pkl``, ``byteorder``, one member per storage
    (``numel`` items of its class's size, ``skew`` bytes off), ``version``."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, (cls, numel) in sorted(storages.items()):
            size = max(0, min(numel, 1 << 16) * STORAGES.get(cls, 1) + skew)
            name = "archive/data/" + key.encode("utf-8", "replace").decode("utf-8")
            z.writestr(name, bytes(range(256)) * (size // 256) + bytes(size % 256))
        z.writestr("archive/version", "3\n")
    return out.getvalue()


def torch_archives() -> st.SearchStrategy[bytes]:
    """Whole ``torch.save`` archives around generated pickles."""

    def build(root: Node, ed: list[tuple[int, bytes | None]], skew: int) -> bytes:
        data, prog = compile_pickle(root, ed)
        return archive(data, prog.storages, skew=skew)

    return st.builds(build, trees, edits, st.sampled_from([0, 0, 0, 1, -1]))


def pickles() -> st.SearchStrategy[bytes]:
    """Bare ``data.pkl`` bytes (the unpickler alone)."""
    return st.builds(lambda root, ed: compile_pickle(root, ed)[0], trees, edits)
