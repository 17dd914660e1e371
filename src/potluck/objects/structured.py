"""Structured updates of a 2-D tensor: the *model* part of object format v2.

A changed matrix whose delta against its base is low-rank (a merged LoRA/DoRA, a rank-limited
edit) or row-/column-scaled ((IA)^3 merged, per-channel requantisation) is stored as a small
model (integer factors, float32 scales) plus, per chunk, the exact residual of the new bit
patterns against potluck's own reconstruction from the base. Element ``(i, j)`` is rebuilt as::

    x = float64(base[i, j])
    x = x * (row[i] * col[j])            # only with scales (the product is exact)
    x = x + (sum_k U[i, k] * V[j, k]) * (2**eu[i] * 2**ev[j])   # only with factors
    recon = round(x)                     # F32: float64 -> float32 (nearest even);
                                         # F16: -> float32 -> float16; BF16: -> float32, then
                                         # (b + 0x7FFF + (b >> 16 & 1)) >> 16 on the
                                         # float32 bits b, modulo 2**32

The factors are integers below ``2**factor_bits(rank)`` (24 bits at rank 8) with a power-of-two
scale per row of U and per row of V, so for one element every product and every partial sum
of the low-rank term is an integer below 2**53 at one common scale: exact in float64 in any
order. The term is therefore computed by a BLAS matrix product (fast, any thread count) and
is still the same bits on every machine; the rest is elementwise IEEE arithmetic with one
rounding per step. The residual is ``new_bits - recon_bits`` modulo 2**bits, zigzag-mapped
(small negative differences become small numbers), byte-grouped and zstd-compressed.

Model section layout (little-endian), stored after the object header::

    u32 length of what follows
    u8  flags: 1 = row scales, 2 = column scales, 4 = low-rank factors
    u8  dtype code: 1 = F32, 2 = F16, 3 = BF16
    u16 rank (0 without factors)
    u32 rows m, u32 cols n
    f32[m] row scales, f32[n] column scales (when flagged)
    with factors: i8[m] eu, i8[n] ev, i32[m * rank] U (row-major), i32[n * rank] V (row-major)

Detection (``structdetect``) runs only at encode time; it is deterministic on one machine
whatever the thread count (numpy's einsum and pairwise sums, no BLAS), and nothing it computes
needs to be reproduced by a decoder: the stored factors are the model.
"""

from __future__ import annotations

import functools
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from potluck.errors import CorruptObjectError

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    F32 = NDArray[np.float32]
    F64 = NDArray[np.float64]
    I32 = NDArray[np.int32]
    I8 = NDArray[np.int8]

ROWS = 1
COLS = 2
LOWRANK = 4
DTYPE_CODES = {"F32": 1, "F16": 2, "BF16": 3}
DTYPE_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2}
_ITEMSIZE = {1: 4, 2: 2, 3: 2}
#: detection runs on matrices of at least this many bytes and at most this many elements (an
#: F32 matrix of 64 MiB: detection holds both versions, as float32, plus blocks of float64)
MIN_BYTES = 64 << 10
MAX_ELEMENTS = 1 << 24
MAX_RANK = 64
#: a sampled singular value must drop by this factor after the rank
_GAP = 4.0
#: at most this many rows and columns form the detection sample
_SAMPLE = 256
#: a scale model is tried when the sample's ratios fit it to this relative deviation (the
#: median; twice the dtype's unit roundoff: what rounding a scaled value leaves)
_SCALE_FIT = {"F32": 2.0**-23, "F16": 2.0**-10, "BF16": 2.0**-7}
_HEAD = struct.Struct("<BBHII")


def factor_bits(rank: int) -> int:
    """Factor integers of a rank-``rank`` model stay below ``2**factor_bits(rank)`` in
    magnitude, so a sum of ``rank`` products stays below 2**53 (exact in float64)."""
    return (53 - max(rank, 1).bit_length()) // 2


_SEED = 0x706C6B


@dataclass(frozen=True)
class Model:
    """A structured update: optional row/column scales and low-rank factors (float32)."""

    dtype: str
    m: int
    n: int
    row: F32 | None = None
    col: F32 | None = None
    u: I32 | None = None  # (m, rank) integers, row i times 2**eu[i]
    v: I32 | None = None  # (n, rank) integers, row j times 2**ev[j]
    eu: I8 | None = None
    ev: I8 | None = None

    @functools.cached_property
    def _factors64(self) -> tuple[F64, F64] | None:
        import numpy as np

        if self.u is None or self.v is None or self.eu is None or self.ev is None:
            return None
        u = self.u.astype(np.float64) * _pow2(self.eu)[:, None]  # powers of two: exact
        v = self.v.astype(np.float64) * _pow2(self.ev)[:, None]
        return u, np.ascontiguousarray(v)

    def factors64(self) -> tuple[F64, F64] | None:
        """U and V as float64 with their scales applied (exact), once per model."""
        return self._factors64

    @property
    def rank(self) -> int:
        """Number of rank-1 terms."""
        return 0 if self.u is None else int(self.u.shape[1])

    @property
    def itemsize(self) -> int:
        """Bytes per element of the tensor."""
        return _ITEMSIZE[DTYPE_CODES[self.dtype]]

    @property
    def kind(self) -> str:
        """A short name for listings: lowrank, rowscale, colscale, scale or a combination."""
        scale = {1: "rowscale", 2: "colscale", 3: "scale"}.get(
            (ROWS if self.row is not None else 0) | (COLS if self.col is not None else 0)
        )
        parts = [p for p in (scale, f"lowrank{self.rank}" if self.rank else None) if p]
        return "+".join(parts)

    def to_bytes(self) -> bytes:
        """The model section (with its length prefix)."""
        flags = (ROWS if self.row is not None else 0) | (COLS if self.col is not None else 0)
        flags |= LOWRANK if self.rank else 0
        body = [_HEAD.pack(flags, DTYPE_CODES[self.dtype], self.rank, self.m, self.n)]
        for arr in (self.row, self.col):
            if arr is not None:
                body.append(arr.astype("<f4").tobytes())
        if self.u is not None and self.v is not None:
            assert self.eu is not None and self.ev is not None
            body += [self.eu.astype("i1").tobytes(), self.ev.astype("i1").tobytes()]
            body += [self.u.astype("<i4").tobytes(), self.v.astype("<i4").tobytes()]
        data = b"".join(body)
        return struct.pack("<I", len(data)) + data


def _corrupt(message: str) -> CorruptObjectError:
    return CorruptObjectError(
        f"corrupt object: {message}",
        hint="run `potluck fsck` to find damaged objects and restore them from a remote",
    )


HEAD_SIZE = _HEAD.size


def section_length(head: bytes, size: int, itemsize: int) -> int:
    """The length a model section must have, from its first ``HEAD_SIZE`` bytes, checked
    against the object's ``size`` and ``itemsize`` (so a damaged length reads nothing)."""
    if len(head) < _HEAD.size:
        raise _corrupt(f"model section of {len(head)} bytes is too short")
    flags, code, rank, m, n = (int(v) for v in _HEAD.unpack_from(head))
    dtype = {v: k for k, v in DTYPE_CODES.items()}.get(code)
    bad_rank = bool(flags & LOWRANK) != (rank > 0) or rank > MAX_RANK
    if dtype is None or flags & ~(ROWS | COLS | LOWRANK) or bad_rank:
        raise _corrupt(f"model section has bad flags {flags}, dtype {code} or rank {rank}")
    if _ITEMSIZE[code] != itemsize or m * n * itemsize != size:
        raise _corrupt(f"model of a {m}x{n} {dtype} matrix does not fit {size} bytes")
    scales = 4 * ((m if flags & ROWS else 0) + (n if flags & COLS else 0))
    return _HEAD.size + scales + (m + n) * rank * 4 + (m + n if rank else 0)


def parse_model(data: bytes, size: int, itemsize: int) -> Model:
    """The model of a section body (without its length prefix), checked against the object's
    ``size`` and ``itemsize``."""
    import numpy as np

    want = section_length(data, size, itemsize)
    if len(data) != want:
        raise _corrupt(f"model section has {len(data)} bytes, not {want}")
    flags, code, rank, m, n = _HEAD.unpack_from(data)
    dtype = {v: k for k, v in DTYPE_CODES.items()}[code]
    scales = 4 * ((m if flags & ROWS else 0) + (n if flags & COLS else 0))
    floats = np.frombuffer(data, "<f4", offset=_HEAD.size, count=scales // 4).astype(np.float32)
    row = floats[:m] if flags & ROWS else None
    col = floats[m if flags & ROWS else 0 :] if flags & COLS else None
    if not rank:
        return Model(dtype, m, n, row, col)
    at = _HEAD.size + scales
    exps = np.frombuffer(data, "i1", offset=at, count=m + n).astype(np.int8)
    eu, ev = exps[:m], exps[m:]
    ints = np.frombuffer(data, "<i4", offset=at + m + n).astype(np.int32)
    if int(np.abs(ints.astype(np.int64)).max()) >= 1 << factor_bits(rank):
        raise _corrupt(f"model factors exceed {factor_bits(rank)} bits")
    u, v = ints[: m * rank].reshape(m, rank), ints[m * rank :].reshape(n, rank)
    return Model(dtype, m, n, row, col, u, v, eu, ev)


# --- reconstruction (the decoder's side: must be bit-identical everywhere) -----------------------


def to_float64(bits: bytes | memoryview, dtype: str) -> F64:
    """Values of little-endian ``dtype`` elements as float64 (exact)."""
    import numpy as np

    if dtype == "F32":
        return np.frombuffer(bits, "<f4").astype(np.float64)
    if dtype == "F16":
        return np.frombuffer(bits, "<f2").astype(np.float64)
    wide = np.frombuffer(bits, "<u2").astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32).astype(np.float64)


def round_bits(x: F64, dtype: str) -> NDArray[np.unsignedinteger]:  # type: ignore[type-arg]
    """Bit patterns of ``x`` rounded to ``dtype`` (the module docstring's rounding)."""
    import numpy as np

    f = x.astype(np.float32)
    if dtype == "F32":
        return f.view(np.uint32)
    if dtype == "F16":
        return f.astype(np.float16).view(np.uint16)
    b = f.view(np.uint32)
    b16 = b >> np.uint32(16)
    np.add(b, np.uint32(0x7FFF), out=b)  # modulo 2**32: also defined for NaN and infinities
    np.add(b, b16 & np.uint32(1), out=b)
    return (b >> np.uint32(16)).astype(np.uint16)


#: elements reconstructed at once: the float64 work arrays of a block are about 2 MiB, not the
#: ~45 MB a whole 4 MiB chunk of bf16 needed (every element is computed on its own, and the
#: low-rank term row by row exactly, so the block size never changes a bit); 2**16 decodes a
#: bf16 chunk as fast as 2**18 did and holds 3 MiB less
BLOCK_ELEMENTS = 1 << 16


def reconstruct(model: Model, base: bytes | memoryview, start: int) -> bytes:
    """Bit patterns of the reconstruction of elements ``[start, start + len(base)/itemsize)``
    (``base`` holds the base's bytes of those elements), ``BLOCK_ELEMENTS`` at a time."""
    return bytes(reconstruct_array(model, base, start).tobytes())


def reconstruct_array(model: Model, base: bytes | memoryview, start: int) -> Any:
    """``reconstruct`` as a new writable array of unsigned integers of the element width (not
    copied out: ``residual`` and ``add_residual`` take it as it is)."""
    import numpy as np

    k = model.itemsize
    count = len(base) // k
    view = memoryview(base).cast("B")
    out = np.empty(count, np.uint32 if model.dtype == "F32" else np.uint16)
    for s in range(0, count, BLOCK_ELEMENTS):
        e = min(count, s + BLOCK_ELEMENTS)
        out[s:e] = _reconstruct_block(model, view[s * k : e * k], start + s, e - s)
    return out


def _reconstruct_block(
    model: Model, base: memoryview, start: int, count: int
) -> NDArray[np.unsignedinteger]:  # type: ignore[type-arg]
    """``reconstruct`` of ``count`` elements from ``start``: their bit patterns."""
    import numpy as np

    n = model.n
    r0, r1 = start // n, (start + count - 1) // n + 1
    off = start - r0 * n  # the elements are [off, off + count) of rows r0..r1, flattened
    x = to_float64(base, model.dtype)
    if model.row is not None or model.col is not None:
        rs = np.ones(r1 - r0) if model.row is None else model.row[r0:r1].astype(np.float64)
        cs = np.ones(n) if model.col is None else model.col.astype(np.float64)
        np.multiply(x, np.multiply.outer(rs, cs).reshape(-1)[off : off + count], out=x)
    factors = model.factors64()
    if factors is not None:
        # each (i, j): integer products at one power-of-two scale, sums below 2**53: exact
        with _one_blas_thread():  # chunks decode in parallel already; the sum is exact anyway
            term = np.matmul(factors[0][r0:r1], factors[1].T)
        np.add(x, term.reshape(-1)[off : off + count], out=x)
    return round_bits(x, model.dtype)


class _OneBlasThread:
    """While any thread is inside, BLAS runs one thread (its original count comes back when
    the last one leaves): reconstructions run on a pool of their own, and BLAS threads on top
    of it only spin. The low-rank term is exact, so this changes speed, never bits."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.limiter: Any = None
        self.controller: Any = None

    def __enter__(self) -> None:
        with self.lock:
            if self.users == 0:
                if self.controller is None:
                    from threadpoolctl import ThreadpoolController

                    self.controller = ThreadpoolController()
                self.limiter = self.controller.limit(limits=1, user_api="blas")
            self.users += 1

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.limiter is not None:
                self.limiter.restore_original_limits()
                self.limiter = None


_BLAS_GUARD = _OneBlasThread()


def _one_blas_thread() -> _OneBlasThread:
    return _BLAS_GUARD


def residual(new: bytes | memoryview, recon: Any, itemsize: int) -> bytes:
    """Zigzag-mapped ``new - recon`` per element, modulo 2**(8 * itemsize) (``recon``: bytes,
    or a ``reconstruct_array``)."""
    import numpy as np

    u, i = ("<u4", "<i4") if itemsize == 4 else ("<u2", "<i2")
    d: Any = np.subtract(np.frombuffer(new, u), np.frombuffer(recon, u)).view(i)
    del recon  # a reconstruction passed as a temporary is freed here
    for s in range(0, len(d), BLOCK_ELEMENTS):  # in place: no other chunk-sized work array
        block = d[s : s + BLOCK_ELEMENTS]
        sign = block >> (8 * itemsize - 1)
        np.left_shift(block, 1, out=block)
        np.bitwise_xor(block, sign, out=block)
    return bytes(d.view(u).tobytes())


def apply_residual(res: bytes, recon: bytes, itemsize: int) -> bytes:
    """Inverse of ``residual``: the new bit patterns."""
    import numpy as np

    u: Any = np.uint32 if itemsize == 4 else np.uint16
    return add_residual(res, np.frombuffer(recon, u).copy(), itemsize)


def add_residual(res: bytes, recon: Any, itemsize: int) -> bytes:
    """``apply_residual`` written into ``recon`` (a writable ``reconstruct_array``, changed),
    block by block: no chunk-sized work array besides the two given."""
    import numpy as np

    u: Any = np.uint32 if itemsize == 4 else np.uint16
    if recon.dtype != u:
        raise ValueError(f"a reconstruction of {recon.dtype} for itemsize {itemsize}")
    z = cast(Any, np.frombuffer(res, u))
    if len(z) != len(recon):
        raise ValueError(f"a residual of {len(z)} elements for {len(recon)}")
    for s in range(0, len(z), BLOCK_ELEMENTS):
        block = z[s : s + BLOCK_ELEMENTS]
        d = block >> u(1)
        low = block & u(1)
        np.negative(low, out=low)  # 0 or all ones, modulo 2**w (``0 - low``)
        np.bitwise_xor(d, low, out=d)
        out = recon[s : s + BLOCK_ELEMENTS]
        np.add(out, d, out=out)
    del z, res  # a residual passed as a temporary is freed before the copy out
    return bytes(recon.tobytes())


def _pow2(e: I8) -> F64:
    import numpy as np

    return np.ldexp(np.ones(e.shape), e.astype(np.int32))


def quantize(a: F64, bits: int) -> tuple[I32, I8]:
    """Rows of ``a`` (finite) as integers below ``2**bits`` times ``2**e[row]``: (ints, e)."""
    import numpy as np

    top = np.abs(a).max(axis=1) if a.size else np.zeros(a.shape[0])
    _, ex = np.frexp(top)  # top < 2**ex (0 for a zero row)
    e = np.clip(ex.astype(np.int64) - bits, -127, 127)
    limit = float(1 << bits) - 1
    q = np.clip(np.rint(np.ldexp(a, -e[:, None])), -limit, limit)
    return q.astype(np.int32), e.astype(np.int8)


def eligible(dtype: str | None, shape: tuple[int, ...] | None, size: int) -> bool:
    """Whether ``detect`` may look at a tensor of this dtype, shape and byte size."""
    if dtype not in DTYPE_CODES or shape is None or len(shape) != 2:
        return False
    m, n = shape
    fits = m * n <= MAX_ELEMENTS and m * n * DTYPE_ITEMSIZE[dtype] == size
    return min(m, n) >= 8 and size >= MIN_BYTES and fits
