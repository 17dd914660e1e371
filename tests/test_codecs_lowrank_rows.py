"""lowrank's row-sparse mode (``rows="changed"``) and float16 factors."""

from __future__ import annotations

import numpy as np

from potluck.codecs import get_codec, payload_nbytes


def _embedding(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    base = rng.standard_normal((300, 24)).astype(np.float32)
    rows = np.sort(rng.choice(300, 20, replace=False))
    new = base.copy()
    new[rows] += (rng.standard_normal((20, 3)) @ rng.standard_normal((3, 24))).astype(np.float32)
    return base, new, rows


def test_changed_rows_only_leaves_the_others_bit_for_bit() -> None:
    base, new, rows = _embedding(np.random.default_rng(0))
    codec = get_codec("lowrank")
    p = codec.encode(new, base, name="wte", seed=0, rank=3, rows="changed")
    assert p.meta["mode"] == "row_factors"
    np.testing.assert_array_equal(p.arrays["rows"], rows.astype(np.uint32))
    assert p.arrays["lora_B"].shape == (20, 3)
    out = codec.decode(p, base)
    untouched = np.setdiff1d(np.arange(300), rows)
    np.testing.assert_array_equal(out[untouched], base[untouched])
    np.testing.assert_allclose(out[rows], new[rows], atol=1e-5)  # the delta has rank 3
    full = codec.encode(new, base, name="wte", seed=0, rank=3)
    assert payload_nbytes(p) < payload_nbytes(full) / 5


def test_float16_factors_halve_the_bytes_within_the_reported_error() -> None:
    base, new, _rows = _embedding(np.random.default_rng(1))
    codec = get_codec("lowrank")
    f32 = codec.encode(new, base, name="wte", seed=0, rank=3, rows="changed")
    f16 = codec.encode(new, base, name="wte", seed=0, rank=3, rows="changed", factors="F16")
    assert f16.arrays["lora_A"].dtype == np.float16
    assert f16.arrays["lora_B"].nbytes * 2 == f32.arrays["lora_B"].nbytes
    out = codec.decode(f16, base)
    delta = new.astype(np.float64) - base
    rel = np.linalg.norm(out.astype(np.float64) - new) / np.linalg.norm(delta)
    assert f16.error is not None
    assert abs(f16.error.relative_error - rel) <= 1e-6 * max(rel, 1e-12) + 1e-9
    assert rel < 2e-3  # float16 factors of a rank-3 delta: about 2⁻¹¹ relative
