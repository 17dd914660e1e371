"""The task_mask codec: payload layout, the two-model decode and its refusals."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from potluck.codecs import Payload, get_codec
from potluck.codecs.mask import decode_masked, mask_payload
from potluck.errors import IntegrityError, UserError

ORIGIN = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
MERGED = ORIGIN + np.array([[0.5, -1.0, 0.25], [2.0, 0.0, -0.5]], np.float32)
MASK = np.array([[True, False, True], [False, True, True]])


def test_layout_and_decode() -> None:
    p = mask_payload(MASK, 2.0, ORIGIN, method="emr")
    assert p.arrays["mask"].tolist() == [0b110101]  # first element in the lowest bit
    assert p.meta["scale"] == 2.0 and p.meta["shape"] == "[2, 3]" and p.meta["dtype"] == "F32"
    got = decode_masked(p, MERGED, ORIGIN, name="w")
    want = np.where(MASK, ORIGIN + 2.0 * (MERGED - ORIGIN), ORIGIN)
    np.testing.assert_array_equal(got, want)
    # γ = 1 selects element by element, bit for bit, in any dtype
    o16, m16 = ORIGIN.astype(ml_dtypes.bfloat16), MERGED.astype(ml_dtypes.bfloat16)
    got16 = decode_masked(mask_payload(MASK, 1.0, o16, method="tall_masks"), m16, o16, name="w")
    assert got16.dtype == o16.dtype
    assert got16.tobytes() == np.where(MASK, m16, o16).tobytes()


def test_refusals() -> None:
    p = mask_payload(MASK, 1.0, ORIGIN, method="tall_masks")
    codec = get_codec("task_mask")
    with pytest.raises(UserError, match="one base is not enough"):
        codec.decode(p, MERGED)
    with pytest.raises(UserError, match="is written by merges, not by `patch create`"):
        codec.encode(MERGED, ORIGIN, name="w", seed=0)
    with pytest.raises(IntegrityError, match="expected sha256 " + str(p.meta["origin"])):
        decode_masked(p, MERGED, ORIGIN + 1, name="w")
    with pytest.raises(UserError, match=r"made for a F32 tensor of shape \[2, 3\]"):
        decode_masked(p, MERGED.reshape(3, 2), ORIGIN, name="w")
    bad = Payload("task_mask", p.arrays, {**p.meta, "scale": "x"})
    with pytest.raises(UserError, match="malformed task_mask payload: meta 'scale' is 'x'"):
        decode_masked(bad, MERGED, ORIGIN, name="w")
    short = Payload("task_mask", {"mask": np.zeros(0, np.uint8)}, p.meta)
    with pytest.raises(UserError, match="0 bytes cannot hold 6 bits"):
        decode_masked(short, MERGED, ORIGIN, name="w")
