"""Payloads built from given factors, deltas or scales (``factors_payload``, ``dense_payload``,
``scales_payload``) decode like the codec's own, and the shared ``Param`` renders both ways."""

from __future__ import annotations

import numpy as np
import pytest

from potluck.codecs import (
    Param,
    decode_payload,
    dense_payload,
    factors_payload,
    get_codec,
    scales_payload,
)
from potluck.errors import UserError
from potluck.merging import Param as MergeParam


def test_factors_payload_decodes_to_base_plus_b_a(rng: np.random.Generator) -> None:
    base = rng.normal(size=(4, 6)).astype(np.float32)
    b, a = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(2, 6)).astype(np.float32)
    p = factors_payload(b, a, shape=base.shape, dtype="F32", source="peft")
    assert p.codec == "lowrank" and p.error is None
    assert list(p.meta)[:3] == ["version", "shape", "dtype"]
    assert list(p.meta)[-4:] == ["mode", "kept_rank", "randomized", "source"]
    assert p.meta["rank"] == 2 and p.meta["kept_rank"] == 2 and p.meta["source"] == "peft"
    defaults = get_codec("lowrank").resolve_params({"rank": 2})
    assert {k: p.meta[k] for k in defaults} == defaults
    np.testing.assert_array_equal(decode_payload(p, base), base + b @ a)


def test_rank_zero_factors_keep_rank_one_in_the_parameters() -> None:
    b, a = np.zeros((3, 0), np.float32), np.zeros((0, 5), np.float32)
    p = factors_payload(b, a, shape=(3, 5), dtype="F32")
    assert p.meta["rank"] == 1 and p.meta["kept_rank"] == 0 and "source" not in p.meta
    base = np.ones((3, 5), np.float32)
    np.testing.assert_array_equal(decode_payload(p, base), base)


def test_dense_and_scales_payloads_decode(rng: np.random.Generator) -> None:
    bias = rng.normal(size=5).astype(np.float32)
    delta = rng.normal(size=5).astype(np.float32)
    p = dense_payload(delta, shape=bias.shape, dtype="F32")
    assert p.meta["mode"] == "dense" and p.meta["kept_rank"] == 0 and "randomized" not in p.meta
    np.testing.assert_array_equal(decode_payload(p, bias), bias + delta)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    s = rng.uniform(0.5, 1.5, 3).astype(np.float32)
    q = scales_payload(s, 1, shape=w.shape, dtype="F32")
    assert list(q.meta) == ["version", "shape", "dtype", "axis"]
    np.testing.assert_allclose(decode_payload(q, w), w * s, rtol=1e-6)


def test_one_param_type_for_codecs_and_merge_methods() -> None:
    assert Param is MergeParam
    p = Param(float, 0.1, "kept", low=0.0, high=1.0, low_open=True, name="density")
    assert p.describe() == "density: float = 0.1 in (0, 1] — kept"
    assert p.allowed() == "(0, 1]"
    assert Param(int, 16, "r", low=1, name="rank").describe() == "rank: int = 16 in [1, inf] — r"
    assert Param(int, 16, "r", low=1).allowed() == "[1, inf)"
    assert p.convert("0.5", "dare") == 0.5
    with pytest.raises(UserError, match="invalid value 0 for parameter 'density' of codec 'x'"):
        p.convert(0, "x")
    with pytest.raises(UserError, match=r"merge method 'm': parameter 'd' = 0\.0 is not allowed"):
        p.check("m", "d", 0.0)
