"""Lossy codecs: naive references, hand-checked cases, declared errors, DARE statistics."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.codecs import CODECS, ErrorReport, Payload, get_codec, payloads_equal

SETTINGS = settings(derandomize=True, deadline=None, max_examples=30)
LOSSY = [  # one-base codecs (task_mask needs the merged model and the original base)
    n
    for n in CODECS.names()
    if not CODECS.get(n).exact and not getattr(CODECS.get(n), "two_models", False)
]


def _pair(
    rng: np.random.Generator, shape: tuple[int, ...], scale: float = 0.1
) -> tuple[np.ndarray, np.ndarray]:
    base = rng.normal(size=shape)
    return base, base + rng.normal(0, scale, size=shape)


def _delta_hat(codec: str, payload: Payload, base: np.ndarray) -> np.ndarray:
    """Δ̂ as seen by a user: decode(payload, base) − base, in float64."""
    return get_codec(codec).decode(payload, base).astype(np.float64) - base.astype(np.float64)


def _naive_report(delta: np.ndarray, approx: np.ndarray) -> tuple[float, float]:
    diff = [float(a) - float(d) for a, d in zip(approx.ravel(), delta.ravel(), strict=True)]
    err = math.sqrt(sum(x * x for x in diff))
    norm = math.sqrt(sum(float(d) ** 2 for d in delta.ravel()))
    return err / norm, max((abs(x) for x in diff), default=0.0)


def _naive_topk(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.ravel()
    k = min(flat.size, math.ceil(round(density * flat.size, 9)))
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


# --- error reports equal an independent computation, for every lossy codec ---------------------

KEPT = {
    "sparse_topk": lambda d, p: np.count_nonzero(p) / d.size,
    "sparse_threshold": lambda d, p: np.count_nonzero(p) / d.size,
    "dare": lambda d, p: np.count_nonzero(p) / d.size,
    "ternary": lambda d, p: np.count_nonzero(p) / d.size,
}


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("shape", [(12, 10), (7,), (2, 3, 4)])
def test_reported_error_matches_independent_computation(
    codec: str, shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    base, new = _pair(rng, shape)
    params = {"sparse_threshold": {"threshold": 0.1}, "lowrank": {"rank": 3}}.get(codec, {})
    payload = get_codec(codec).encode(new, base, name="w", seed=3, **params)
    approx = _delta_hat(codec, payload, base)
    rel, max_abs = _naive_report(new - base, approx)
    err = payload.error
    assert isinstance(err, ErrorReport)
    assert err.relative_error == pytest.approx(rel, rel=1e-9, abs=1e-12)
    assert err.max_abs_error == pytest.approx(max_abs, rel=1e-9, abs=1e-12)
    if codec in KEPT:
        assert err.kept_fraction == pytest.approx(KEPT[codec](new - base, approx))
    elif codec == "lowrank" and len(shape) >= 2:
        side = min(shape[0], math.prod(shape[1:]))
        assert err.kept_fraction == pytest.approx(min(3, side) / side)
    else:
        assert err.kept_fraction == 1.0


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (0, 4), (1,), (1, 1)])
def test_lossy_codecs_handle_scalars_and_empty_tensors(
    codec: str, shape: tuple[int, ...], rng: np.random.Generator
) -> None:
    base = rng.normal(size=shape).astype(np.float32)
    new = base + np.float32(0.5)
    c = get_codec(codec)
    out = c.decode(c.encode(new, base, name="w", seed=0), base)
    assert out.shape == shape and out.dtype == np.float32


@pytest.mark.parametrize("codec", LOSSY)
@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_lossy_decode_keeps_dtype_and_is_deterministic(codec: str, dtype: type) -> None:
    rng = np.random.default_rng(5)
    base = rng.normal(size=(8, 4)).astype(dtype)
    new = (base.astype(np.float64) + rng.normal(0, 0.05, (8, 4))).astype(dtype)
    c = get_codec(codec)
    a, b = (c.encode(new, base, name="w", seed=1) for _ in range(2))
    assert payloads_equal(a, b)
    out = c.decode(a, base)
    assert out.dtype == np.dtype(dtype) and out.shape == (8, 4)


# --- sparse_topk / sparse_threshold ----------------------------------------------------------


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 6), min_size=1, max_size=3).map(tuple),
    density=st.floats(0.01, 1.0),
    seed=st.integers(0, 2**16),
)
def test_topk_matches_full_sort_reference(
    shape: tuple[int, ...], density: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape)
    new = base + np.round(rng.normal(size=shape), 1)  # rounding makes ties
    payload = get_codec("sparse_topk").encode(new, base, name="w", seed=0, density=density)
    expected = _naive_topk(new - base, density)
    kept = np.zeros(math.prod(shape), np.float64)
    kept[np.cumsum(payload.arrays["positions"].astype(np.int64))] = payload.arrays["values"]
    np.testing.assert_array_equal(kept.reshape(shape), expected)


def test_topk_density_one_keeps_everything(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (9, 7))
    payload = get_codec("sparse_topk").encode(new, base, name="w", seed=0, density=1.0)
    assert payload.error is not None and payload.error.kept_fraction == 1.0
    np.testing.assert_allclose(
        get_codec("sparse_topk").decode(payload, base), new, rtol=0, atol=1e-14
    )
    b16, n16 = base.astype(ml_dtypes.bfloat16), new.astype(ml_dtypes.bfloat16)
    p16 = get_codec("sparse_topk").encode(n16, b16, name="w", seed=0, density=1.0)
    assert get_codec("sparse_topk").decode(p16, b16).tobytes() == n16.tobytes()


def test_threshold_matches_loop_reference(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (10, 10))
    new[0, :3] = base[0, :3]  # unchanged elements are never stored
    payload = get_codec("sparse_threshold").encode(new, base, name="w", seed=0, threshold=0.08)
    delta = new - base
    expected = np.array([d if abs(d) >= 0.08 and d != 0 else 0.0 for d in delta.ravel()])
    np.testing.assert_array_equal(_sparse_values(payload, delta.size), expected)
    np.testing.assert_allclose(
        _delta_hat("sparse_threshold", payload, base).ravel(), expected, atol=1e-14
    )
    zero = get_codec("sparse_threshold").encode(new, base, name="w", seed=0)
    assert zero.arrays["values"].size == 97
    np.testing.assert_allclose(get_codec("sparse_threshold").decode(zero, base), new, atol=1e-14)


def _sparse_values(payload: Payload, size: int) -> np.ndarray:
    out = np.zeros(size)
    out[np.cumsum(payload.arrays["positions"].astype(np.int64))] = payload.arrays["values"]
    return out


# --- DARE ----------------------------------------------------------------------------------------


def test_dare_is_reproducible_and_order_independent(rng: np.random.Generator) -> None:
    tensors = {f"layers.{i}.w": _pair(rng, (16, 16)) for i in range(3)}
    dare = get_codec("dare")

    def run(order: list[str], seed: int) -> dict[str, Payload]:
        return {
            n: dare.encode(tensors[n][1], tensors[n][0], name=n, seed=seed, density=0.3)
            for n in order
        }

    forward, backward = run(sorted(tensors), 11), run(sorted(tensors, reverse=True), 11)
    assert all(payloads_equal(forward[n], backward[n]) for n in tensors)
    other = run(sorted(tensors), 12)
    assert not any(payloads_equal(forward[n], other[n]) for n in tensors)
    masks = [tuple(np.cumsum(p.arrays["positions"].astype(np.int64))) for p in forward.values()]
    assert len(set(masks)) == 3  # each tensor name gets its own stream


def test_dare_rescales_kept_values_and_is_unbiased() -> None:
    rng = np.random.default_rng(0)
    base, new = _pair(rng, (40,), scale=1.0)
    delta = new - base
    dare = get_codec("dare")
    total, kept = np.zeros(40), 0
    runs, density = 400, 0.5
    for seed in range(runs):
        payload = dare.encode(new, base, name="w", seed=seed, density=density)
        values = _sparse_values(payload, 40)
        nz = values != 0
        np.testing.assert_allclose(values[nz], delta[nz] / density, rtol=1e-12)
        total += values
        kept += int(nz.sum())
    sigma = np.abs(delta) * math.sqrt((1 / density - 1) / runs)
    assert np.all(np.abs(total / runs - delta) <= 5 * sigma + 1e-12)
    assert abs(kept / (runs * 40) - density) < 0.02


# --- ternary (ComPEFT) and bitdelta ------------------------------------------------------------


@pytest.mark.parametrize("scale", ["std", "mean_abs"])
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_ternary_matches_reference(scale: str, density: float, rng: np.random.Generator) -> None:
    base, new = _pair(rng, (13, 11))
    delta = new - base
    payload = get_codec("ternary").encode(
        new, base, name="w", seed=0, density=density, scale=scale, alpha=2.0
    )
    kept = _naive_topk(delta, density)
    signs = np.sign(kept)
    magnitude = np.std(delta) if scale == "std" else np.abs(kept[kept != 0]).mean()
    np.testing.assert_allclose(
        _delta_hat("ternary", payload, base), 2.0 * magnitude * signs, rtol=1e-9, atol=1e-12
    )
    assert payload.arrays["signs"].size == math.ceil(delta.size / 4)  # 2 bits a sign
    assert payload.arrays["scale"].shape == (1,)


def test_ternary_defaults_follow_the_paper() -> None:
    defaults = get_codec("ternary").resolve_params({})
    assert defaults == {"density": 0.1, "scale": "std", "alpha": 1.0}


def test_bitdelta_of_a_known_delta() -> None:
    base = np.zeros((2, 2))
    new = np.array([[1.0, -3.0], [0.0, 2.0]])
    payload = get_codec("bitdelta").encode(new, base, name="w", seed=0)
    np.testing.assert_array_equal(payload.arrays["scales"], [1.5])
    np.testing.assert_array_equal(payload.arrays["signs"], [0b1101])
    np.testing.assert_array_equal(
        get_codec("bitdelta").decode(payload, base), [[1.5, -1.5], [1.5, 1.5]]
    )


def test_bitdelta_one_scale_per_matrix(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (3, 4, 5))
    payload = get_codec("bitdelta").encode(new, base, name="w", seed=0)
    delta = new - base
    expected = np.empty_like(delta)
    for i in range(3):
        scale = sum(abs(x) for x in delta[i].ravel()) / delta[i].size
        expected[i] = np.where(delta[i] >= 0, scale, -scale)
    np.testing.assert_allclose(_delta_hat("bitdelta", payload, base), expected, rtol=1e-9)
    assert payload.arrays["scales"].shape == (3,) and payload.arrays["signs"].size == 8


# --- quant ---------------------------------------------------------------------------------------


def _loop_quant(delta: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray]:
    """Python loops over rows and groups: codes and scales."""
    qmax = 2 ** (bits - 1) - 1
    rows = delta.reshape(-1, delta.shape[-1])
    size = group or rows.shape[1]
    q = np.zeros(rows.shape, np.int64)
    scales = []
    for r, row in enumerate(rows):
        row_scales = []
        for start in range(0, len(row), size):
            chunk = row[start : start + size]
            scale = max(abs(float(x)) for x in chunk) / qmax
            row_scales.append(scale)
            for j, x in enumerate(chunk):
                q[r, start + j] = round(float(x) / scale) if scale else 0
        scales.append(row_scales)
    return q.reshape(delta.shape), np.array(scales)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [0, 4, 5])
def test_quant_matches_loop_reference(bits: int, group_size: int, rng: np.random.Generator) -> None:
    base, new = _pair(rng, (3, 2, 13))
    delta = new - base
    payload = get_codec("quant").encode(
        new, base, name="w", seed=0, bits=bits, group_size=group_size
    )
    q_ref, scales_ref = _loop_quant(delta, bits, group_size)
    np.testing.assert_allclose(payload.arrays["scales"], scales_ref, rtol=1e-15)
    approx = _delta_hat("quant", payload, base)
    groups = np.repeat(scales_ref, group_size or 13, axis=1)[:, :13].reshape(delta.shape)
    np.testing.assert_allclose(approx, q_ref * groups, rtol=1e-9, atol=1e-15)
    # the declared bound: max abs error ≤ scale / 2 per group
    assert np.all(np.abs(approx - delta) <= groups / 2 * (1 + 1e-9) + 1e-15)
    if bits == 8:
        np.testing.assert_array_equal(payload.arrays["q"], q_ref)
    else:
        assert payload.arrays["q"].dtype == np.uint8 and payload.arrays["q"].size == 39


def test_quant_int8_of_a_constant_row() -> None:
    base = np.zeros((2, 6), np.float32)
    new = np.array([[0.25] * 6, [0.0] * 6], np.float32)
    payload = get_codec("quant").encode(new, base, name="w", seed=0)
    np.testing.assert_array_equal(payload.arrays["q"], [[127] * 6, [0] * 6])
    np.testing.assert_array_equal(payload.arrays["scales"], np.float32([[0.25 / 127], [0.0]]))
    np.testing.assert_allclose(get_codec("quant").decode(payload, base), new, rtol=1e-6)
    assert payload.error is not None and payload.error.max_abs_error < 1e-7


# --- lowrank -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_lowrank_error_is_the_tail_energy(rank: int, rng: np.random.Generator) -> None:
    base, new = _pair(rng, (9, 6))
    delta = new - base
    payload = get_codec("lowrank").encode(new, base, name="w", seed=0, rank=rank, method="exact")
    s = np.linalg.svd(delta, compute_uv=False)
    tail = math.sqrt(float(np.sum(s[rank:] ** 2))) / float(np.linalg.norm(delta))
    assert payload.error is not None
    assert payload.error.relative_error == pytest.approx(tail, rel=1e-9, abs=1e-12)
    u, _, vt = np.linalg.svd(delta, full_matrices=False)
    reference = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(_delta_hat("lowrank", payload, base), reference, atol=1e-12)
    assert payload.arrays["lora_B"].shape == (9, rank) and payload.arrays["lora_A"].shape == (
        rank,
        6,
    )


def test_lowrank_full_rank_is_exact_up_to_rounding(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (5, 4, 2))  # treated as a 5 × 8 matrix
    payload = get_codec("lowrank").encode(new, base, name="w", seed=0, rank=50)
    assert payload.meta["kept_rank"] == 5
    np.testing.assert_allclose(get_codec("lowrank").decode(payload, base), new, atol=1e-12)


def test_lowrank_energy_picks_the_smallest_rank(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (10, 8))
    s = np.linalg.svd(new - base, compute_uv=False)
    cum = np.cumsum(s**2) / np.sum(s**2)
    payload = get_codec("lowrank").encode(new, base, name="w", seed=0, rank=8, energy=0.7)
    assert payload.meta["kept_rank"] == int(np.argmax(cum >= 0.7)) + 1


def test_lowrank_randomized_matches_exact_and_is_reproducible() -> None:
    rng = np.random.default_rng(2)
    m, n = 600, 520
    base = rng.normal(size=(m, n)).astype(np.float32)
    low = rng.normal(size=(m, 5)) @ rng.normal(size=(5, n))
    new = (base + low + rng.normal(0, 1e-3, (m, n))).astype(np.float32)
    lowrank = get_codec("lowrank")
    auto = lowrank.encode(new, base, name="q_proj", seed=4, rank=8)
    assert auto.meta["randomized"] == 1
    again = lowrank.encode(new, base, name="q_proj", seed=4, rank=8)
    assert payloads_equal(auto, again)
    exact = lowrank.encode(new, base, name="q_proj", seed=4, rank=8, method="exact")
    assert exact.meta["randomized"] == 0
    assert auto.error is not None and exact.error is not None
    assert auto.error.relative_error <= exact.error.relative_error * 1.01 + 1e-6


def test_lowrank_vectors_fall_back_to_dense(rng: np.random.Generator) -> None:
    base, new = _pair(rng, (7,))
    payload = get_codec("lowrank").encode(new, base, name="b", seed=0)
    assert payload.meta["mode"] == "dense" and set(payload.arrays) == {"delta"}
    np.testing.assert_allclose(get_codec("lowrank").decode(payload, base), new, atol=1e-14)


# --- ia3 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_ia3_matches_per_channel_least_squares(axis: int, rng: np.random.Generator) -> None:
    base, new = _pair(rng, (4, 5, 3))
    payload = get_codec("ia3").encode(new, base, name="w", seed=0, axis=axis)
    moved_b, moved_n = np.moveaxis(base, axis, 0), np.moveaxis(new, axis, 0)
    ref = []
    for b, n in zip(moved_b, moved_n, strict=True):
        num = sum(float(x) * float(y) for x, y in zip(b.ravel(), n.ravel(), strict=True))
        ref.append(num / sum(float(x) ** 2 for x in b.ravel()))
    np.testing.assert_allclose(payload.arrays["scales"], ref, rtol=1e-12)
    expected = np.moveaxis(moved_b * np.array(ref)[:, None, None], 0, axis)
    np.testing.assert_allclose(get_codec("ia3").decode(payload, base), expected, rtol=1e-12)
    assert payload.meta["axis"] == axis % 3


def test_ia3_recovers_a_true_channel_scaling(rng: np.random.Generator) -> None:
    base = rng.normal(size=(6, 4))
    scales = np.array([1.0, 0.5, 2.0, -1.0, 1.25, 0.0])
    new = base * scales[:, None]
    payload = get_codec("ia3").encode(new, base, name="w", seed=0)
    np.testing.assert_allclose(payload.arrays["scales"], scales, atol=1e-12)
    assert payload.error is not None and payload.error.relative_error < 1e-12
