"""``qlowrank``: quantised low-rank factors against a naive reference, its stated error bound,
its byte count, and malformed payloads."""

from __future__ import annotations

import math

import numpy as np
import pytest

from potluck.codecs import get_codec, payload_nbytes
from potluck.codecs.qlowrank import factor_bytes, mixed_bytes, predicted_sq_error
from potluck.errors import UserError


def _pair(m: int = 48, n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((m, n)).astype(np.float32)
    spectrum = 0.5 ** np.arange(min(m, n))
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    delta = (u * spectrum) @ v.T * 0.01
    return base, (base + delta).astype(np.float32)


def _naive(delta: np.ndarray, rank: int, bits: int, high: int = 0) -> np.ndarray:
    """Element by element: exact SVD, per-row absmax scale, round half even, multiply back
    (the ``high`` leading directions with 8 bits)."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    out = np.zeros(delta.shape, np.float64)
    for i in range(rank):
        qmax = 2 ** ((8 if i < high else bits) - 1) - 1
        rows = []
        for vec in (u[:, i] * s[i], vt[i]):
            vec = vec.astype(np.float32)
            scale = np.float32(max(abs(float(x)) for x in vec) / qmax)
            rows.append(np.array([round(float(x / scale)) * scale for x in vec]))
        out += np.outer(rows[0], rows[1])
    return out


@pytest.mark.parametrize("bits", [8, 4])
def test_matches_naive_reference(bits: int) -> None:
    base, new = _pair()
    delta = new.astype(np.float32) - base
    codec = get_codec("qlowrank")
    payload = codec.encode(new, base, name="w", seed=0, rank=6, bits=bits, method="exact")
    got = codec.decode(payload, base).astype(np.float64) - base
    want = (base.astype(np.float64) + _naive(delta, 6, bits)).astype(np.float32) - base
    assert np.allclose(got, want, rtol=0, atol=1e-6)
    assert payload_nbytes(payload) == factor_bytes(6, 48, 80, bits)
    assert payload.meta["kept_rank"] == 6


@pytest.mark.parametrize(("bits", "rank"), [(8, 4), (8, 12), (4, 4), (4, 12)])
def test_error_within_stated_bound(bits: int, rank: int) -> None:
    base, new = _pair()
    delta = (new.astype(np.float32) - base).astype(np.float64)
    p = get_codec("qlowrank").encode(new, base, name="w", seed=0, rank=rank, bits=bits)
    s = np.linalg.svd(delta, compute_uv=False)
    m, n = delta.shape
    sb = p.arrays["b_scales"].astype(np.float64)
    sa = p.arrays["a_scales"].astype(np.float64)
    a_norm = 1 + math.sqrt(n) * sa / 2
    bound = math.sqrt(float(np.sum(s[rank:] ** 2)))
    bound += float(np.sum(math.sqrt(m) * sb / 2 * a_norm + s[:rank] * math.sqrt(n) * sa / 2))
    norm = float(np.linalg.norm(delta))
    assert p.error is not None
    assert p.error.relative_error * norm <= bound * (1 + 1e-5)
    # the expected-error model the allocator uses is within 2x of the real error here
    u, _s, vt = np.linalg.svd(delta, full_matrices=False)
    sq = predicted_sq_error(
        s[:rank], np.abs(u[:, :rank]).max(0), np.abs(vt[:rank]).max(1), m, n, bits
    )
    predicted = math.sqrt(float(np.sum(s[rank:] ** 2) + sq.sum())) / norm
    assert 0.5 <= predicted / p.error.relative_error <= 2.0


def test_rank_zero_stores_nothing_and_decodes_to_base() -> None:
    base, new = _pair()
    codec = get_codec("qlowrank")
    p = codec.encode(new, base, name="w", seed=0, rank=0, bits=4)
    assert payload_nbytes(p) == 0
    assert np.array_equal(codec.decode(p, base), base)
    assert p.error is not None and p.error.relative_error == 1.0


def test_one_d_tensor_is_dense_and_exact() -> None:
    base = np.arange(5, dtype=np.float32)
    new = base + np.float32(0.25)
    codec = get_codec("qlowrank")
    p = codec.encode(new, base, name="b", seed=0, rank=3, bits=8)
    assert p.meta["mode"] == "dense"
    assert np.array_equal(codec.decode(p, base), new)


def test_malformed_rank_refused() -> None:
    base, new = _pair()
    codec = get_codec("qlowrank")
    p = codec.encode(new, base, name="w", seed=0, rank=4, bits=8)
    p.meta["kept_rank"] = 99
    with pytest.raises(UserError, match="malformed qlowrank payload: kept_rank 99"):
        codec.decode(p, base)


def test_changed_rows_only_are_factored_and_the_rest_stay_exact() -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((40, 16)).astype(np.float32)
    new = base.copy()
    new[[2, 9, 30]] += np.float32(0.5) * rng.standard_normal((3, 16)).astype(np.float32)
    codec = get_codec("qlowrank")
    p = codec.encode(new, base, name="emb", seed=0, rank=3, bits=8, rows="changed")
    assert p.meta["mode"] == "row_factors"
    assert p.arrays["rows"].tolist() == [2, 9, 30]
    assert payload_nbytes(p) == factor_bytes(3, 3, 16, 8) + 3 * 4
    got = codec.decode(p, base)
    untouched = np.setdiff1d(np.arange(40), [2, 9, 30])
    assert np.array_equal(got[untouched], base[untouched])
    assert p.error is not None and p.error.relative_error < 0.02


def test_mixed_precision_matches_naive_and_beats_int4() -> None:
    base, new = _pair()
    delta = new.astype(np.float32) - base
    codec = get_codec("qlowrank")
    kw: dict[str, object] = {"rank": 8, "bits": 4, "method": "exact"}
    mixed = codec.encode(new, base, name="w", seed=0, high=3, **kw)
    got = codec.decode(mixed, base).astype(np.float64) - base
    want = (base.astype(np.float64) + _naive(delta, 8, 4, high=3)).astype(np.float32) - base
    assert np.allclose(got, want, rtol=0, atol=1e-6)
    assert payload_nbytes(mixed) == mixed_bytes(8, 3, 48, 80, 4)
    plain = codec.encode(new, base, name="w", seed=0, **kw)
    assert mixed.error is not None and plain.error is not None
    assert mixed.error.relative_error < plain.error.relative_error
    mixed.meta["high"] = 9
    with pytest.raises(UserError, match="malformed qlowrank payload: high 9 for kept_rank 8"):
        codec.decode(mixed, base)
