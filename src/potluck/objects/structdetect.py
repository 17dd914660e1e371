"""Finding a structured update (``objects.structured``) between two versions of a matrix.

Only the encoder runs this. A sample of at most 256 x 256 entries of the delta decides which
model to try: a low-rank one when its singular values drop by ``_GAP`` after some rank <= the
cap (64 and min(m, n) / 8), a scale model when the ratios new/old fit row and/or column scales.
The full-size factors come from one randomized subspace iteration computed with einsum and
pairwise sums (no BLAS: the same bytes whatever the thread count), rows in blocks so only the
two tensors (as float32) and a few blocks are held. A model is kept when compressing a sample
of its residual, plus its factors, beats the XOR delta stored otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from potluck.objects.structured import (
    _GAP,
    _SAMPLE,
    _SCALE_FIT,
    _SEED,
    MAX_RANK,
    Model,
    factor_bits,
    quantize,
    reconstruct,
    residual,
)

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

    F32 = NDArray[np.float32]
    F64 = NDArray[np.float64]

#: rows x columns of one block of the delta held in float64
_BLOCK = 1 << 19
#: elements per sampled span for the size estimate, and how many spans
_SPAN = 1 << 16
_SPANS = 4
#: a model must beat the XOR delta by this factor (it adds a header and work on checkout)
_MARGIN = 0.95


def _raw(bits: bytes, dtype: str, shape: tuple[int, int]) -> NDArray[np.generic]:
    """The matrix as stored (F32, F16, or BF16 bit patterns as uint16), without a copy."""
    import numpy as np

    kind = {"F32": "<f4", "F16": "<f2"}.get(dtype, "<u2")
    return np.frombuffer(bits, kind).reshape(shape)


def _floats(raw: NDArray[np.generic], dtype: str) -> F32:
    """Elements of ``_raw`` (or a piece of it) as float32 (exact; no copy for F32)."""
    import numpy as np

    if dtype == "F32":
        return raw.astype(np.float32, copy=False)
    if dtype == "F16":
        return raw.astype(np.float32)
    wide = raw.astype(np.uint32) << np.uint32(16)
    return wide.view(np.float32)


def _finite(raw: NDArray[np.generic], dtype: str) -> bool:
    """Whether every element of a matrix as stored is finite (checked in row blocks)."""
    import numpy as np

    m, n = raw.shape
    return all(bool(np.isfinite(_floats(raw[a:b], dtype)).all()) for a, b in _row_blocks(m, n))


def _row_blocks(m: int, n: int) -> Iterator[tuple[int, int]]:
    step = max(1, _BLOCK // n)
    for a in range(0, m, step):
        yield a, min(m, a + step)


def _mgs(y: F64) -> F64:
    """Orthonormal columns spanning ``y`` (modified Gram-Schmidt, twice; columns that vanish
    are dropped), with pairwise sums only."""
    import numpy as np

    kept: list[F64] = []
    for j in range(y.shape[1]):
        v = y[:, j].copy()
        norm0 = float(np.sqrt(np.add.reduce(v * v)))
        for _ in range(2):
            for q in kept:
                v -= np.add.reduce(q * v) * q
        norm = float(np.sqrt(np.add.reduce(v * v)))
        if norm0 == 0 or norm <= 1e-9 * norm0:
            continue
        kept.append(v / norm)
    return np.stack(kept, axis=1) if kept else np.zeros((y.shape[0], 0))


class _Delta:
    """``new - old`` of two matrices as stored (``_raw``), in float64 row blocks: each block
    is converted on its own (exact), so no float32 copy of a whole matrix is held."""

    def __init__(self, old: NDArray[np.generic], new: NDArray[np.generic], dtype: str) -> None:
        self.old, self.new, self.dtype = old, new, dtype
        self.m, self.n = old.shape

    def blocks(self) -> Iterator[tuple[int, int, F64]]:
        import numpy as np

        for a, b in _row_blocks(self.m, self.n):
            new = _floats(self.new[a:b], self.dtype)
            yield a, b, new.astype(np.float64) - _floats(self.old[a:b], self.dtype)

    def times(self, wt: F64) -> F64:
        """``D @ wt.T`` for ``wt`` of shape (k, n)."""
        import numpy as np

        out = np.empty((self.m, wt.shape[0]))
        for a, b, d in self.blocks():
            out[a:b] = np.einsum("ij,kj->ik", d, wt)
        return out

    def t_times(self, q: F64) -> F64:
        """``q.T @ D`` for ``q`` of shape (m, k): shape (k, n), block sums in row order."""
        import numpy as np

        out = np.zeros((q.shape[1], self.n))
        for a, b, d in self.blocks():
            out += np.einsum("ik,ij->kj", q[a:b], d)
        return out


def _sample_rank(ds: F64, m: int, n: int) -> int:
    """The rank after which the sample's singular values drop by ``_GAP`` (0: none)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):  # an oversubscribed BLAS is 10x slower here
        sv = np.linalg.svd(ds, compute_uv=False)
    cap = min(MAX_RANK, min(m, n) // 8, len(sv) - 1)
    if cap < 1 or sv[0] <= 0:
        return 0
    ratios = sv[:cap] / np.maximum(sv[1 : cap + 1], sv[0] * 1e-30)
    r = int(np.argmax(ratios)) + 1
    return r if ratios[r - 1] >= _GAP else 0


def _lowrank(delta: _Delta, rank: int, dtype: str) -> Model | None:
    """Rank-``rank`` factors of the delta: one subspace iteration from a fixed random start."""
    import numpy as np

    omega = np.random.default_rng(_SEED).standard_normal((rank, delta.n))
    q = _mgs(delta.times(omega))
    q = _mgs(delta.times(delta.t_times(q)))
    if q.shape[1] == 0:
        return None
    bits = factor_bits(q.shape[1])
    u, eu = quantize(q, bits)
    uf = u.astype(np.float64) * np.ldexp(1.0, eu.astype(np.int32))[:, None]
    v, ev = quantize(delta.t_times(uf).T, bits)
    return Model(dtype, delta.m, delta.n, u=u, v=np.ascontiguousarray(v), eu=eu, ev=ev)


def _ratios(old: F32, new: F32) -> F64:
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):
        q = new.astype(np.float64) / old
    q[old == 0] = np.nan
    return q


def _median(q: F64, axis: int) -> F64:
    import numpy as np

    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            med = np.nanmedian(q, axis=axis)
    return np.where(np.isfinite(med), med, 1.0)


def _scale_kind(qs: F64, dtype: str) -> int:
    """Which scale model fits the sampled ratios: 1 rows, 2 columns, 3 both, 0 none."""
    import numpy as np

    r = _median(qs, 1)
    c = _median(qs, 0)
    rc = r[:, None] * _median(qs / r[:, None], 0)[None, :]
    for kind, fit in ((1, r[:, None]), (2, c[None, :]), (3, rc)):
        with np.errstate(all="ignore"):
            dev = np.abs(qs / fit - 1)
        if np.isfinite(dev).any() and np.nanmedian(dev) < _SCALE_FIT[dtype]:
            return kind
    return 0


def _scales(old: F32, new: F32, kind: int, dtype: str) -> Model:
    """Row and/or column scales of the whole matrix (medians of new/old, in blocks)."""
    import numpy as np

    m, n = old.shape
    row = np.ones(m)
    if kind & 1:
        for a, b in _row_blocks(m, n):
            row[a:b] = _median(_ratios(old[a:b], new[a:b]), 1)
    col = None
    if kind & 2:
        col = np.ones(n)
        step = max(1, _BLOCK // m)
        for a in range(0, n, step):
            q = _ratios(old[:, a : a + step], new[:, a : a + step]) / row[:, None]
            col[a : a + step] = _median(q, 0)
    return Model(
        dtype,
        m,
        n,
        row=row.astype(np.float32) if kind & 1 else None,
        col=col.astype(np.float32) if col is not None else None,
    )


def candidates(old_bits: bytes, new_bits: bytes, dtype: str, shape: tuple[int, int]) -> list[Model]:
    """Models worth a size test for this pair of versions (possibly none)."""
    import numpy as np

    m, n = shape
    rows = np.unique(np.linspace(0, m - 1, min(m, _SAMPLE)).astype(np.int64))
    cols = np.unique(np.linspace(0, n - 1, min(n, _SAMPLE)).astype(np.int64))
    pick = np.ix_(rows, cols)  # the sample, converted alone: most pairs end here
    olds = _floats(_raw(old_bits, dtype, shape)[pick], dtype)
    news = _floats(_raw(new_bits, dtype, shape)[pick], dtype)
    if not (np.isfinite(olds).all() and np.isfinite(news).all()):
        return []
    ds = news.astype(np.float64) - olds
    if np.count_nonzero(ds) < ds.size // 2:
        return []  # sparse changes: the XOR delta is good at those
    kind = _scale_kind(_ratios(olds, news), dtype)
    rank = _sample_rank(ds, m, n)
    if not (kind or rank):
        return []
    old_raw, new_raw = _raw(old_bits, dtype, shape), _raw(new_bits, dtype, shape)
    if not (_finite(old_raw, dtype) and _finite(new_raw, dtype)):
        return []
    found: list[Model] = []
    if kind:
        found.append(_scales(_floats(old_raw, dtype), _floats(new_raw, dtype), kind, dtype))
    model = _lowrank(_Delta(old_raw, new_raw, dtype), rank, dtype) if rank else None
    if model is not None:
        found.append(model)
    return found


def _spans(count: int) -> list[tuple[int, int]]:
    if count <= _SPAN * _SPANS:
        return [(0, count)]
    step = count // _SPANS
    return [(i * step, i * step + _SPAN) for i in range(_SPANS)]


def best_model(
    old_bits: bytes,
    new_bits: bytes,
    dtype: str,
    shape: tuple[int, int],
    compress: Callable[[bytes], bytes],
    group: Callable[[bytes, int], bytes],
    xor: Callable[[bytes, bytes], bytes],
) -> Model | None:
    """The candidate model whose estimated size (factors plus the compressed residual of a few
    sampled spans, scaled up) beats the XOR delta's estimate by ``_MARGIN``, or None."""
    models = candidates(old_bits, new_bits, dtype, shape)
    if not models:
        return None
    k = models[0].itemsize
    count = len(new_bits) // k
    spans = _spans(count)
    sampled = sum(b - a for a, b in spans)
    olds = [old_bits[a * k : b * k] for a, b in spans]
    news = [new_bits[a * k : b * k] for a, b in spans]
    xors = [len(compress(group(xor(o, x), k))) for o, x in zip(olds, news, strict=True)]
    best, best_cost = None, _MARGIN * sum(xors) * count / sampled
    for model in models:
        sizes = [
            len(compress(group(residual(x, reconstruct(model, o, a), k), k)))
            for (a, _), o, x in zip(spans, olds, news, strict=True)
        ]
        cost = len(model.to_bytes()) + sum(map(min, sizes, xors)) * count / sampled
        if cost < best_cost:
            best, best_cost = model, cost
    return best
