"""Codec layer: interface, registry, rules, errors, and bit-exact round trips of exact codecs."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.codecs import (
    CODECS,
    DEFAULT_RULES,
    PLAIN_DTYPES,
    Payload,
    choose_codec,
    get_codec,
    payload_nbytes,
    payloads_equal,
)
from potluck.errors import UserError

SETTINGS = settings(derandomize=True, deadline=None, max_examples=30)
EXACT = ["full", "exact_xor", "exact_sparse"]
#: Codecs rebuilt from one base (``task_mask`` needs the merged model and the original base).
ONE_BASE = [n for n in CODECS.names() if not getattr(CODECS.get(n), "two_models", False)]
LOSSY = [n for n in ONE_BASE if n not in EXACT]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16, np.float64, np.int64, np.uint8, np.bool_]


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """(base, new) of one dtype and shape; arbitrary bit patterns (NaN, −0, inf) included."""
    dt = np.dtype(draw(st.sampled_from(DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
    n = math.prod(shape)

    def bools() -> np.ndarray:
        return np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), bool)

    def array() -> np.ndarray:
        if dt == np.bool_:
            return bools().reshape(shape)
        raw = draw(st.binary(min_size=n * dt.itemsize, max_size=n * dt.itemsize))
        return np.frombuffer(raw, dt).reshape(shape).copy()

    base, other = array(), array()
    new = np.where(bools().reshape(shape), other, base).astype(dt)
    return base, new


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _check_plain(payload: Payload) -> None:
    for arr in payload.arrays.values():
        assert type(arr) is np.ndarray and arr.dtype in PLAIN_DTYPES
    for value in payload.meta.values():
        assert isinstance(value, str | int | float) and not isinstance(value, bool)


@pytest.mark.parametrize("codec", EXACT)
@SETTINGS
@given(pair=tensor_pairs())
def test_exact_codecs_round_trip_bit_for_bit(codec: str, pair: tuple[np.ndarray, ...]) -> None:
    base, new = pair
    c = get_codec(codec)
    payload = c.encode(new, base, name="t", seed=0)
    assert c.exact and payload.error is None and payload.codec == codec
    _check_plain(payload)
    assert _bits_equal(c.decode(payload, base), new)


@pytest.mark.parametrize("codec", EXACT)
@pytest.mark.parametrize(
    "base,new",
    [
        (np.array(1.5, np.float32), np.array(-0.0, np.float32)),
        (np.zeros((0, 3), ml_dtypes.bfloat16), np.zeros((0, 3), ml_dtypes.bfloat16)),
        (
            np.array([0.0, 1.0, np.nan, -0.0], ml_dtypes.bfloat16),
            np.array([-0.0, 1.0, np.inf, np.nan], ml_dtypes.bfloat16),
        ),
        (
            np.arange(6, dtype=np.int64).reshape(2, 3),
            np.arange(6, dtype=np.int64)[::-1].reshape(2, 3),
        ),
        (np.array([1 + 2j, 3j], np.complex128), np.array([1 + 2j, -3j], np.complex128)),
        (np.zeros(5, ml_dtypes.float8_e4m3fn), np.ones(5, ml_dtypes.float8_e4m3fn)),
    ],
)
def test_exact_codecs_pinned_cases(codec: str, base: np.ndarray, new: np.ndarray) -> None:
    c = get_codec(codec)
    payload = c.encode(new, base, name="t", seed=0)
    _check_plain(payload)
    assert _bits_equal(c.decode(payload, base), new)


def test_exact_sparse_stores_only_changed_elements() -> None:
    base = np.zeros(1000, np.float32)
    new = base.copy()
    new[[3, 500, 999]] = [1.0, -0.0, np.nan]
    payload = get_codec("exact_sparse").encode(new, base, name="t", seed=0)
    assert payload.meta["changed"] == 3
    assert payload.arrays["values"].dtype == np.uint32
    assert list(np.cumsum(payload.arrays["positions"].astype(np.int64))) == [3, 500, 999]


def test_exact_xor_of_identical_tensors_is_tiny() -> None:
    base = np.random.default_rng(0).normal(size=(256, 256)).astype(np.float32)
    payload = get_codec("exact_xor").encode(base.copy(), base, name="t", seed=0)
    assert payload_nbytes(payload) < 200
    assert payload_nbytes(payload) == payload.arrays["xor_zstd"].nbytes


def test_full_stores_new_itself() -> None:
    base, new = np.zeros(3, np.float32), np.arange(3, dtype=np.float32)
    payload = get_codec("full").encode(new, base, name="t", seed=0)
    assert payload.meta["stored"] == "array" and _bits_equal(payload.arrays["values"], new)
    bf = get_codec("full").encode(
        new.astype(ml_dtypes.bfloat16), base.astype(ml_dtypes.bfloat16), name="t", seed=0
    )
    assert bf.meta["stored"] == "bits" and bf.arrays["values"].dtype == np.uint16


@pytest.mark.parametrize("codec", ONE_BASE)
def test_payloads_serialise_to_safetensors(codec: str, rng: np.random.Generator) -> None:
    from safetensors.numpy import load, save

    base = rng.normal(size=(6, 8)).astype(ml_dtypes.bfloat16)
    new = (base.astype(np.float32) + rng.normal(0, 0.1, size=(6, 8))).astype(ml_dtypes.bfloat16)
    c = get_codec(codec)
    payload = c.encode(new, base, name="w", seed=7)
    _check_plain(payload)
    meta = {k: str(v) for k, v in payload.meta.items()}
    loaded = load(save(payload.arrays, metadata=meta))
    again = Payload(payload.codec, loaded, payload.meta, payload.error)
    assert payloads_equal(again, payload)
    assert _bits_equal(c.decode(again, base), c.decode(payload, base))
    assert payload.meta["dtype"] == "BF16" and payload.meta["shape"] == "[6, 8]"


def test_registry_lists_every_codec_and_metadata() -> None:
    assert CODECS.names() == sorted(
        [
            "full",
            "exact_xor",
            "exact_sparse",
            "sparse_topk",
            "sparse_threshold",
            "dare",
            "ternary",
            "bitdelta",
            "quant",
            "lowrank",
            "qlowrank",
            "ia3",
            "task_mask",
        ]
    )
    for name, codec in CODECS.items():
        assert codec.name == name
        assert codec.exact == (name in EXACT)
        for spec in codec.params:
            assert spec.describe().startswith(spec.name)
    assert CODECS.get("ternary").reference_url == "https://arxiv.org/abs/2311.13171"
    assert CODECS.get("bitdelta").reference_url == "https://arxiv.org/abs/2402.10193"
    assert CODECS.get("dare").reference_url == "https://arxiv.org/abs/2311.03099"


def test_unknown_codec_lists_known_ones() -> None:
    with pytest.raises(UserError, match="unknown update codec 'lowrnk'") as info:
        get_codec("lowrnk")
    assert "did you mean 'lowrank'" in str(info.value)
    assert "exact_xor" in str(info.value) and "quant" in str(info.value)


F32 = np.zeros((2, 3), np.float32)


@pytest.mark.parametrize("codec", ONE_BASE)
def test_shape_and_dtype_mismatch_are_user_errors(codec: str) -> None:
    c = get_codec(codec)
    with pytest.raises(UserError, match=r"differ in shape: new \[3, 2\], base \[2, 3\]"):
        c.encode(F32.reshape(3, 2), F32, name="w", seed=0)
    with pytest.raises(UserError, match="differ in dtype: new float64, base float32"):
        c.encode(F32.astype(np.float64), F32, name="w", seed=0)
    with pytest.raises(UserError, match="not an array"):
        c.encode([[0.0]], F32, name="w", seed=0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "codec,params,match",
    [
        ("sparse_topk", {"density": 0}, r"invalid value 0 for parameter 'density'"),
        ("sparse_topk", {"density": 1.5}, r"invalid value 1.5 for parameter 'density'"),
        ("dare", {"density": float("nan")}, r"invalid value nan for parameter 'density'"),
        ("quant", {"bits": 3}, r"invalid value 3 for parameter 'bits'"),
        ("quant", {"bits": True}, r"invalid value True for parameter 'bits'"),
        ("quant", {"group_size": -1}, r"invalid value -1 for parameter 'group_size'"),
        ("lowrank", {"method": "fast"}, r"invalid value 'fast' for parameter 'method'"),
        ("lowrank", {"rank": 2.5}, r"invalid value 2.5 for parameter 'rank'"),
        ("sparse_threshold", {"threshold": -1}, r"invalid value -1 for parameter 'threshold'"),
        ("exact_xor", {"level": 99}, r"invalid value 99 for parameter 'level'"),
        ("sparse_topk", {"dens": 0.5}, r"unknown parameter 'dens' for codec 'sparse_topk'"),
        ("full", {"rank": 2}, r"unknown parameter 'rank' for codec 'full'"),
        ("ia3", {"axis": 2}, r"invalid value 2 for parameter 'axis' of codec 'ia3'"),
    ],
)
def test_invalid_params_are_user_errors(codec: str, params: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        get_codec(codec).encode(F32, F32, name="w", seed=0, **params)
    names = [spec.name for spec in get_codec(codec).params]
    if "unknown parameter" in match:  # the hint lists every valid parameter
        assert all(n in str(info.value) for n in names)


def test_params_accept_numeric_strings_and_ints_for_floats() -> None:
    assert get_codec("sparse_topk").resolve_params({"density": "0.5"}) == {"density": 0.5}
    assert get_codec("dare").resolve_params({"density": 1}) == {"density": 1.0}
    assert get_codec("quant").resolve_params({"bits": "4"}) == {"bits": 4, "group_size": 0}


@pytest.mark.parametrize("codec", LOSSY)
def test_lossy_codecs_refuse_integer_tensors_and_nan(codec: str) -> None:
    c = get_codec(codec)
    ints = np.zeros((2, 2), np.int64)
    with pytest.raises(UserError, match="needs a floating-point tensor; 'w' is I64"):
        c.encode(ints, ints, name="w", seed=0)
    nan = np.full((2, 2), np.nan, np.float32)
    with pytest.raises(UserError, match="NaN or infinite"):
        c.encode(nan, np.zeros((2, 2), np.float32), name="w", seed=0)


@pytest.mark.parametrize("codec", ONE_BASE)
def test_decode_checks_the_base(codec: str) -> None:
    c = get_codec(codec)
    payload = c.encode(F32 + 1, F32, name="w", seed=0)
    with pytest.raises(UserError, match=r"made for a F32 tensor of shape \[2, 3\]"):
        c.decode(payload, F32.reshape(3, 2))
    with pytest.raises(UserError, match="made for a F32 tensor"):
        c.decode(payload, F32.astype(np.float16))
    other = "full" if codec != "full" else "exact_xor"
    with pytest.raises(UserError, match=f"cannot decode a '{codec}' payload"):
        get_codec(other).decode(payload, F32)


def test_malformed_payloads_are_user_errors() -> None:
    base = np.zeros(4, np.float32)
    good = get_codec("exact_sparse").encode(base + 1, base, name="w", seed=0)
    bad = Payload(
        "exact_sparse", {**good.arrays, "positions": np.array([1, 0, 1, 1], np.uint8)}, good.meta
    )
    with pytest.raises(UserError, match="malformed exact_sparse payload: positions"):
        get_codec("exact_sparse").decode(bad, base)
    with pytest.raises(UserError, match="payload arrays must be plain numeric"):
        Payload("full", {"values": base.astype(ml_dtypes.bfloat16)}, {})
    q = get_codec("quant").encode(base + 1, base, name="w", seed=0)
    del q.arrays["scales"]
    with pytest.raises(UserError, match="array 'scales' is missing"):
        get_codec("quant").decode(q, base)


def test_choose_codec_first_match_wins_and_default() -> None:
    rules = [
        ("*.norm.*", "exact_xor", {}),
        ("layers.*.attn.*", "lowrank", {"rank": 8}),
        ("layers.*", "quant", {"bits": 4}),
    ]
    codec, params = choose_codec("layers.0.attn.q.weight", rules)
    assert codec.name == "lowrank" and params["rank"] == 8 and params["method"] == "auto"
    codec, params = choose_codec("layers.1.mlp.weight", rules)
    assert codec.name == "quant" and params == {"bits": 4, "group_size": 0}
    codec, params = choose_codec("layers.1.norm.weight", rules)
    assert codec.name == "exact_xor"
    codec, _ = choose_codec("lm_head.weight", rules, default=("full", {}))
    assert codec.name == "full"
    assert choose_codec("LAYERS.0.attn.q", rules)[0].name == "exact_xor"  # case-sensitive
    assert (
        choose_codec("model.layers.0.self_attn.q_proj.weight", DEFAULT_RULES)[0].name == "lowrank"
    )
    assert (
        choose_codec("model.layers.0.input_layernorm.weight", DEFAULT_RULES)[0].name == "exact_xor"
    )


def test_choose_codec_validates_every_rule() -> None:
    with pytest.raises(UserError, match=r"codec rule #1 \('\*b\*' → 'lowrnk'\): unknown update"):
        choose_codec("a", [("a", "full", {}), ("*b*", "lowrnk", {})])
    with pytest.raises(UserError, match=r"codec rule #0 .*unknown parameter 'rnk'"):
        choose_codec("a", [("x", "lowrank", {"rnk": 2})])
    with pytest.raises(UserError, match="each rule is"):
        choose_codec("a", [("x", "lowrank")])  # type: ignore[list-item]
