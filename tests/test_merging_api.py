"""Merge-method API: registry, parameter schema, input validation, keyed randomness, invariants."""

from __future__ import annotations

from collections.abc import Iterator

import ml_dtypes
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS, MergeMethod, Param, keyed_generator, three_way_combine
from potluck.merging.steps import trim

SHAPE = (3, 4)
BASE_METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs"]
BASE_METHODS += ["breadcrumbs_ties", "della", "della_linear", "model_stock", "tsv"]
BASE_METHODS += ["consensus", "tall_masks", "emr", "adamerging"]
BASE_METHODS += ["iso_c", "iso_cts"]
BASE_METHODS += ["sce", "nearswap", "arcee_fusion"]
#: methods of one model besides the base, and their required parameters
ONE_MODEL = {"passthrough": {}, "nearswap": {"t": 0.5}, "arcee_fusion": {}}


def merge(method: str, models, base=None, weights=None, **params) -> np.ndarray:
    return MERGE_METHODS.get(method).merge(models, base, weights, name="w", seed=0, **params)


# ── registry and schema ─────────────────────────────────────────────────────────────────────


def test_builtins_are_registered_with_reference_and_schema() -> None:
    names = set(MERGE_METHODS.names())
    assert set(BASE_METHODS) | {"linear", "slerp", "passthrough"} <= names
    for name, method in MERGE_METHODS.items():
        assert method.name == name
        assert method.reference_url.startswith("https://")
        assert method.needs_base == (name in BASE_METHODS)
        for pname, p in method.params.items():
            assert p.description and p.allowed()
            required = p.default is None  # no default (nearswap's t, as in mergekit)
            assert required or p.check(name, pname, p.default) == p.default


def test_every_method_runs_on_defaults(rng) -> None:
    base = rng.normal(size=SHAPE).astype(np.float32)
    models = [(base + rng.normal(size=SHAPE)).astype(np.float32) for _ in range(2)]
    for name, method in MERGE_METHODS.items():
        ms = models[:1] if name in ONE_MODEL else models
        b, params = (base if method.needs_base else None), ONE_MODEL.get(name, {})
        out = method.merge(ms, b, None, name="w", seed=1, **params)
        assert out.shape == SHAPE
        assert out.dtype == (np.float32 if name == "passthrough" else np.float64)


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(UserError, match="unknown merge method 'tie'") as err:
        MERGE_METHODS.get("tie")
    assert "ties" in err.value.data["known"]
    assert "did you mean 'ties'" in str(err.value.hint)


def test_duplicate_registration_is_refused() -> None:
    with pytest.raises(UserError, match="merge method 'linear' is already registered"):
        MERGE_METHODS.register("linear", MERGE_METHODS.get("linear"))


def test_unknown_parameter_lists_the_valid_ones() -> None:
    with pytest.raises(UserError, match="'ties' has no parameter 'densty'") as err:
        merge("ties", [np.ones(SHAPE)], np.zeros(SHAPE), densty=0.5)
    assert "density" in err.value.data["valid"]
    valid = "consensus, density, lambda_, lines, normalize, rescale"
    assert err.value.hint == f"valid parameters: {valid}"


@pytest.mark.parametrize("density", [0, 0.0, -0.1, 1.5, float("nan"), float("inf")])
def test_density_outside_zero_one(density: float) -> None:
    with pytest.raises(UserError, match=r"parameter 'density' = .* is not allowed") as err:
        merge("ties", [np.ones(SHAPE)], np.zeros(SHAPE), density=density)
    assert err.value.data["allowed"] == "(0, 1]"


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("ties", {"density": "0.5"}),
        ("ties", {"normalize": 1}),
        ("linear", {"normalize": "yes"}),
        ("ties", {"consensus": "vote"}),
        ("dare_ties", {"rescale": True}),
        ("slerp", {"t": 1.2}),
        ("task_arithmetic", {"lambda_": True}),
    ],
)
def test_wrong_parameter_type_or_value(method: str, params: dict[str, object]) -> None:
    m = MERGE_METHODS.get(method)
    with pytest.raises(UserError, match=f"parameter '{next(iter(params))}'"):
        m.resolve_params(params)


def test_parameter_conversion_and_ranges() -> None:
    p = Param(float, 0.5, "x", low=0.0, high=1.0, low_open=True)
    assert p.check("m", "x", 1) == 1.0 and isinstance(p.check("m", "x", 1), float)
    assert p.allowed() == "(0, 1]"
    assert Param(float, 0.0, "x").allowed() == "(-inf, inf)"
    assert Param(str, "a", "x", choices=("a", "b")).allowed() == "one of a, b"
    assert Param(int, 1, "x", low=1).check("m", "x", np.int64(3)) == 3
    with pytest.raises(UserError, match=r"'x' = 2\.5 is not allowed"):
        Param(int, 1, "x").check("m", "x", 2.5)


def test_third_party_method_plugs_in() -> None:
    def negate(inputs, params):
        return -inputs.models[0] * params["k"]

    m = MergeMethod("neg", "https://example.org", "test", negate, {"k": Param(float, 2.0, "k")})
    np.testing.assert_array_equal(m.merge([np.ones(2)], None, None, name="w", seed=0), [-2, -2])


# ── input validation ────────────────────────────────────────────────────────────────────────


def test_shape_mismatch_names_tensor_and_shapes() -> None:
    with pytest.raises(UserError, match=r"tensor 'w': model 1 has shape \[3, 5\] but model 0 has"):
        merge("linear", [np.ones((3, 4)), np.ones((3, 5))])
    with pytest.raises(UserError, match=r"tensor 'w': base has shape \[4\]") as err:
        merge("ties", [np.ones((3, 4))], np.ones(4))
    assert err.value.data["shapes"]["base"] == [4]


def test_dtype_mismatch() -> None:
    a, b = np.ones(SHAPE, np.float32), np.ones(SHAPE, np.float16)
    with pytest.raises(UserError, match="model 1 has dtype float16 but model 0 has float32"):
        merge("linear", [a, b])
    with pytest.raises(UserError, match="base has dtype float16"):
        merge("task_arithmetic", [a], b)


def test_non_float_tensors_are_refused_except_by_passthrough() -> None:
    ints = np.arange(12).reshape(SHAPE)
    with pytest.raises(UserError, match="cannot merge tensor 'w' of dtype int64"):
        merge("linear", [ints, ints])
    out = merge("passthrough", [ints])
    assert out.dtype == ints.dtype
    np.testing.assert_array_equal(out, ints)


def test_low_precision_inputs_compute_in_float64() -> None:
    for dtype in (ml_dtypes.bfloat16, np.float16, ml_dtypes.float8_e4m3fn):
        a, b = np.full(SHAPE, 1.0, dtype), np.full(SHAPE, 2.0, dtype)
        out = merge("linear", [a, b], weights=[1.0, 2.0])
        assert out.dtype == np.float64
        np.testing.assert_allclose(out, 5 / 3)


@pytest.mark.parametrize("method", BASE_METHODS)
def test_method_needing_a_base_without_one(method: str) -> None:
    with pytest.raises(UserError, match=f"merge method '{method}' needs a base model"):
        merge(method, [np.ones(SHAPE)] * (1 if method in ONE_MODEL else 2))


@pytest.mark.parametrize(
    ("method", "count", "match"),
    [
        ("slerp", 3, "needs exactly 2 model"),
        ("slerp", 1, "needs exactly 2 model"),
        ("passthrough", 2, "needs exactly 1 model"),
        ("model_stock", 1, "needs at least 2 model"),
        ("linear", 0, "needs at least 1 model"),
    ],
)
def test_wrong_number_of_models(method: str, count: int, match: str) -> None:
    with pytest.raises(UserError, match=match):
        merge(method, [np.ones(SHAPE)] * count, np.zeros(SHAPE))


def test_weights_length_mismatch() -> None:
    with pytest.raises(UserError, match=r"tensor 'w': 3 weight\(s\) for 2 model\(s\)"):
        merge("linear", [np.ones(SHAPE)] * 2, weights=[1.0, 2.0, 3.0])


def test_bad_weights() -> None:
    with pytest.raises(UserError, match="weights must be finite numbers"):
        merge("linear", [np.ones(SHAPE)] * 2, weights=[1.0, float("nan")])
    with pytest.raises(UserError, match="'slerp' takes no per-model weights"):
        merge("slerp", [np.ones(SHAPE)] * 2, weights=[0.5, 0.5])


def test_bad_seed_or_name() -> None:
    m = MERGE_METHODS.get("dare_ties")
    with pytest.raises(UserError, match="seed must be an integer"):
        m.merge([np.ones(SHAPE)], np.zeros(SHAPE), None, name="w", seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(UserError, match="tensor name must be a string"):
        m.merge([np.ones(SHAPE)], np.zeros(SHAPE), None, name=3, seed=1)  # type: ignore[arg-type]


def test_density_below_one_entry_keeps_the_largest() -> None:
    # as mergekit (max(1, int(d·n))): a tiny tensor is never emptied
    got = merge("ties", [np.array([0.5, -3.0, 1.0, 2.0])], np.zeros(4), density=0.2)
    np.testing.assert_array_equal(got, [0.0, -3.0, 0.0, 0.0])
    np.testing.assert_array_equal(trim(np.array([1.0, -2.0]), 0.1, name="w"), [0.0, -2.0])


# ── keyed randomness ────────────────────────────────────────────────────────────────────────


def test_keyed_generator_same_key_same_stream_in_any_order() -> None:
    keys = [(0, 0, "a"), (0, 1, "a"), (1, 0, "a"), (0, 0, "b")]
    forward = {k: keyed_generator(*k).random(16) for k in keys}
    backward = {k: keyed_generator(*k).random(16) for k in reversed(keys)}
    for k in keys:
        np.testing.assert_array_equal(forward[k], backward[k])
    draws = [forward[k].tobytes() for k in keys]
    assert len(set(draws)) == len(keys)  # seed, model index and tensor name each change it


def test_keyed_generator_is_pinned() -> None:
    """The stream of a key must not change across versions (merges stay reproducible)."""
    got = keyed_generator(42, 1, "model.layers.0.mlp.up_proj.weight").integers(0, 2**32, 3)
    assert got.tolist() == [262043034, 2699648617, 354421971]
    assert isinstance(keyed_generator(0, 0, "").bit_generator, np.random.Philox)


# ── invariants (hypothesis) ─────────────────────────────────────────────────────────────────

FINITE = st.floats(-100, 100, allow_nan=False, allow_infinity=False, width=64)
ARRAYS = hnp.arrays(
    np.float64, hnp.array_shapes(min_dims=1, max_dims=2, max_side=4), elements=FINITE
)
FAST = settings(derandomize=True, deadline=None, max_examples=30)


@FAST
@given(ARRAYS, st.integers(1, 4), st.lists(st.floats(0.1, 5.0), min_size=4, max_size=4))
def test_linear_of_identical_models_is_that_model(x, k, weights) -> None:
    out = merge("linear", [x] * k, weights=weights[:k])
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)


@FAST
@given(ARRAYS, st.data())
def test_task_arithmetic_with_zero_lambda_is_the_base(base, data) -> None:
    other = data.draw(hnp.arrays(np.float64, base.shape, elements=FINITE))
    out = merge("task_arithmetic", [other, other * 2], base, lambda_=0.0)
    np.testing.assert_array_equal(out, base)


@FAST
@given(ARRAYS, st.data(), st.sampled_from(["ties", "dare_ties", "della", "breadcrumbs_ties"]))
def test_identical_fine_tunes_survive_sign_election(base, data, method) -> None:
    x = data.draw(hnp.arrays(np.float64, base.shape, elements=FINITE))
    out = merge(method, [x, x, x], base, normalize=True)  # density 1: nothing dropped
    np.testing.assert_allclose(out, x, rtol=1e-9, atol=1e-9)


@FAST
@given(ARRAYS, st.floats(0.0, 1.0))
def test_slerp_of_identical_models_is_that_model(x, t) -> None:
    np.testing.assert_allclose(merge("slerp", [x, x], t=t), x, rtol=1e-12, atol=1e-12)


@FAST
@given(ARRAYS, st.floats(0.05, 1.0))
def test_trim_keeps_exactly_the_largest(x, density) -> None:
    k = int(density * x.size + 1e-9)
    assume(k > 0)
    out = trim(x, density)
    kept = out != 0
    assert kept.sum() <= k
    np.testing.assert_array_equal(out[kept], x[kept])
    if kept.any() and (~kept).any():
        assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()


def test_three_way_combine_fits_the_merge_driver_hook() -> None:
    ties = MERGE_METHODS.get("ties")
    combine = three_way_combine(ties, "w", seed=0, density=1.0)
    base = np.zeros(2)
    got = combine(base, base + np.array([2.0, -1.0]), base + np.array([-3.0, 1.0]))
    np.testing.assert_array_equal(got, [-3.0, 1.0])
    with pytest.raises(UserError, match="has no parameter 'gamma'"):
        three_way_combine(ties, "w", seed=0, gamma=0.1)


@pytest.mark.parametrize("shape", [(0,), (2, 0), ()])
def test_empty_and_scalar_tensors(shape: tuple[int, ...]) -> None:
    base = np.zeros(shape)
    models = [np.full(shape, 1.0), np.full(shape, 2.0)]
    for name, method in MERGE_METHODS.items():
        ms = models[:1] if name in ONE_MODEL else models
        params = {"density": 0.5} if name in ("dare_ties", "della", "della_linear") else {}
        params.update(ONE_MODEL.get(name, {}))
        out = method.merge(ms, base, None, name="w", seed=0, **params)
        assert out.shape == shape


@settings(max_examples=150, deadline=None)
@given(
    values=hnp.arrays(
        np.float64,
        st.integers(1, 3000),
        elements=st.one_of(
            st.floats(0, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, 2.0**-30])
        ),
    ),
    density=st.floats(0.0005, 0.9995),
    block=st.integers(1, 3000),
    gather=st.sampled_from([0, 3, 1 << 16]),
)
def test_streamed_cut_is_the_whole_array_cut(
    values: np.ndarray, density: float, block: int, gather: int
) -> None:
    """The trim cut found block by block from a histogram of bit patterns (bounded memory) is
    ``magnitude_cut``'s on the whole array (partition), whatever the blocks and however many
    values tie; ``gather`` forces each depth of the digit walk."""
    from potluck.merging import steps

    def blocks() -> Iterator[np.ndarray]:
        return (values[i : i + block] for i in range(0, values.size, block))

    old = steps._GATHER_AT_MOST
    steps._GATHER_AT_MOST = gather
    try:
        got = steps.streamed_cut(blocks, values.size, density)
    finally:
        steps._GATHER_AT_MOST = old
    assert got == steps.magnitude_cut(values.copy(), density)
