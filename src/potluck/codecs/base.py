"""The ``UpdateCodec`` interface, its ``Payload`` and the helpers every codec shares.

A codec turns a fine-tuned tensor ``new`` into a small ``Payload`` relative to a pinned ``base``
tensor of the same shape and dtype, and turns the payload back into a tensor given that base.
Payload arrays are plain numeric numpy arrays (bool, (u)int8…64, float16/32/64) so the patch file
can store them as named safetensors arrays; ``meta`` holds the codec's parameters, the tensor's
shape (a JSON list) and dtype (canonical name) as strings and numbers.
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from potluck.errors import FormatError, UserError
from potluck.params import Param, ParamValue
from potluck.tensors.dtypes import from_numpy, to_numpy

MetaValue = str | int | float
#: Called with a byte range ``[start, stop)`` of the inputs a streaming codec is done with.
Done = Callable[[int, int], None]
Arrays = dict[str, np.ndarray]
Meta = dict[str, MetaValue]

#: Version of the payload layout, stored in every payload's meta.
PAYLOAD_VERSION = 1

#: dtypes a payload array may have: what safetensors stores natively with plain numpy.
PLAIN_DTYPES: frozenset[np.dtype] = frozenset(
    np.dtype(c) for c in ("?", "<u1", "<u2", "<u4", "<u8", "<i1", "<i2", "<i4", "<i8")
) | frozenset(np.dtype(c) for c in ("<f2", "<f4", "<f8"))

_FLOAT_NAMES = frozenset(
    {"F16", "F32", "F64", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"}
)


@dataclass(frozen=True)
class ErrorReport:
    """How far a lossy payload's reconstructed delta Δ̂ is from the true delta Δ = new − base.

    ``relative_error`` is ‖Δ̂ − Δ‖_F / ‖Δ‖_F (0 when both are 0, ``inf`` when only Δ is 0);
    ``max_abs_error`` is max |Δ̂ − Δ|; ``kept_fraction`` is the fraction of the codec's units kept:
    elements of Δ for the sparsifying codecs (top-k, threshold, DARE, ternary), singular values
    (rank / min(m, n)) for ``lowrank`` and 1.0 for the dense approximations (bitdelta, quant,
    ia3). All are computed in float64 at encode time on the compute-dtype Δ; the final rounding of
    base + Δ̂ to the tensor's storage dtype at decode time is not included.
    """

    relative_error: float
    max_abs_error: float
    kept_fraction: float


def _check_payload_arrays(arrays: Mapping[str, Any]) -> None:
    for key, arr in arrays.items():
        if not isinstance(arr, np.ndarray) or arr.dtype not in PLAIN_DTYPES:
            got = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
            raise UserError(
                f"payload array {key!r} has type {got}; payload arrays must be plain numeric",
                hint="store bool, (u)int8-64 or float16/32/64 arrays (bit patterns for bf16/fp8)",
                key=key,
            )


@dataclass(frozen=True, eq=False)
class Payload:
    """What a codec stores for one tensor: named plain arrays, scalar metadata, its error.

    ``error`` is ``None`` for exact codecs. Payloads are compared with ``payloads_equal`` (arrays
    make ``==`` ambiguous).
    """

    codec: str
    arrays: Arrays
    meta: Meta
    error: ErrorReport | None = None

    def __post_init__(self) -> None:
        _check_payload_arrays(self.arrays)
        for key, value in self.meta.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool):
                raise UserError(
                    f"payload meta {key!r} is a {type(value).__name__}; meta values are str, "
                    "int or float",
                    hint="encode structured values as JSON strings",
                    key=key,
                )


def payload_nbytes(payload: Payload) -> int:
    """Bytes taken by a payload's arrays (metadata is not counted)."""
    return sum(int(a.nbytes) for a in payload.arrays.values())


def payload_shape_dtype(payload: Payload) -> tuple[tuple[int, ...], str]:
    """The (shape, canonical dtype) of the tensor a payload rebuilds."""
    try:
        shape = tuple(int(d) for d in json.loads(str(payload.meta["shape"])))
        dtype = str(payload.meta["dtype"])
        to_numpy(dtype)
    except (KeyError, ValueError, TypeError):
        raise FormatError(
            "payload has no valid shape/dtype meta",
            hint="the patch or library is corrupt or was written by another potluck version",
        ) from None
    return shape, dtype


def full_nbytes(payload: Payload) -> int:
    """Bytes of the full tensor a payload rebuilds."""
    shape, dtype = payload_shape_dtype(payload)
    return math.prod(shape) * int(to_numpy(dtype).itemsize)


def payloads_equal(a: Payload, b: Payload) -> bool:
    """True when two payloads have the same codec, meta, error and bit-identical arrays."""
    if a.codec != b.codec or a.meta != b.meta or a.error != b.error:
        return False
    if sorted(a.arrays) != sorted(b.arrays):
        return False
    return all(
        a.arrays[k].dtype == b.arrays[k].dtype
        and a.arrays[k].shape == b.arrays[k].shape
        and a.arrays[k].tobytes() == b.arrays[k].tobytes()
        for k in a.arrays
    )


def stable_key(seed: int, name: str, domain: str) -> int:
    """A 128-bit Philox key from (domain, seed, tensor name); the same on every machine."""
    text = f"potluck:{domain}\x00{int(seed)}\x00{name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def tensor_generator(seed: int, name: str, domain: str) -> np.random.Generator:
    """A counter-based generator keyed by (domain, seed, tensor name).

    Each tensor gets its own stream, so results do not depend on the order tensors are encoded.
    """
    return np.random.Generator(np.random.Philox(key=stable_key(seed, name, domain)))


def shape_text(shape: tuple[int, ...]) -> str:
    """A shape as the JSON list stored in meta."""
    return json.dumps([int(d) for d in shape])


def tensor_meta(shape: tuple[int, ...], dtype: str) -> Meta:
    """The meta every payload starts with: the layout version, the shape and dtype it rebuilds.

    ``dtype`` is the tensor's canonical name (``F32``, ``BF16``…); the codec's parameters and
    its own keys follow in the payload's meta.
    """
    return {"version": PAYLOAD_VERSION, "shape": shape_text(shape), "dtype": dtype}


def check_pair(new: object, base: object, *, codec: str, name: str) -> str:
    """Check ``new`` and ``base`` are arrays of one shape and dtype; return the dtype's name."""
    for label, arr in (("new", new), ("base", base)):
        if not isinstance(arr, np.ndarray):
            raise UserError(
                f"{codec}: {label} tensor of {name!r} is a {type(arr).__name__}, not an array",
                hint="pass numpy arrays",
                name=name,
            )
    assert isinstance(new, np.ndarray) and isinstance(base, np.ndarray)
    if new.shape != base.shape:
        raise UserError(
            f"{codec}: new and base of {name!r} differ in shape: new {list(new.shape)}, "
            f"base {list(base.shape)}",
            hint="a patch only encodes same-shape updates; store a reshaped tensor in full",
            name=name,
        )
    if new.dtype != base.dtype:
        raise UserError(
            f"{codec}: new and base of {name!r} differ in dtype: new {new.dtype}, "
            f"base {base.dtype}",
            hint="cast one to the other's dtype, or store the tensor in full",
            name=name,
        )
    return from_numpy(base.dtype)


def compute_dtype(dtype_name: str, *, codec: str, name: str) -> np.dtype:
    """float64 for F64 tensors, float32 for the other float dtypes; refuse non-float tensors."""
    if dtype_name not in _FLOAT_NAMES:
        raise UserError(
            f"codec {codec!r} needs a floating-point tensor; {name!r} is {dtype_name}",
            hint="use exact_xor, exact_sparse or full for integer, bool and complex tensors",
            name=name,
            dtype=dtype_name,
        )
    return np.dtype(np.float64 if dtype_name == "F64" else np.float32)


def error_report(delta: np.ndarray, approx: np.ndarray, kept_fraction: float) -> ErrorReport:
    """The ``ErrorReport`` of ``approx`` against ``delta`` (computed in float64)."""
    d = delta.astype(np.float64).reshape(-1)
    diff = approx.astype(np.float64).reshape(-1) - d
    err = float(np.linalg.norm(diff))
    norm = float(np.linalg.norm(d))
    rel = err / norm if norm > 0 else (0.0 if err == 0 else float("inf"))
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    return ErrorReport(relative_error=rel, max_abs_error=max_abs, kept_fraction=kept_fraction)


def malformed(codec: str, what: str) -> UserError:
    """The error for a payload whose arrays or meta do not fit together."""
    return UserError(
        f"malformed {codec} payload: {what}",
        hint="the patch is corrupt or was written by another potluck version; re-create it",
        codec=codec,
    )


def meta_int(payload: Payload, key: str) -> int:
    """An int from a payload's meta, or a malformed-payload error."""
    value = payload.meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise malformed(payload.codec, f"meta {key!r} is {value!r}, expected an int")
    return value


def meta_str(payload: Payload, key: str) -> str:
    """A str from a payload's meta, or a malformed-payload error."""
    value = payload.meta.get(key)
    if not isinstance(value, str):
        raise malformed(payload.codec, f"meta {key!r} is {value!r}, expected a string")
    return value


def get_array(
    payload: Payload, key: str, dtype: np.dtype | type, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    """Array ``key`` of a payload, checked for dtype (and shape when given)."""
    arr = payload.arrays.get(key)
    if arr is None:
        raise malformed(payload.codec, f"array {key!r} is missing")
    if arr.dtype != np.dtype(dtype):
        raise malformed(payload.codec, f"array {key!r} has dtype {arr.dtype}, not {dtype}")
    if shape is not None and arr.shape != shape:
        raise malformed(payload.codec, f"array {key!r} has shape {list(arr.shape)}, not {shape}")
    return arr


def _as_array(x: Any) -> Any:
    """numpy scalars (what arithmetic on 0-d arrays returns) become 0-d arrays."""
    return np.asarray(x) if isinstance(x, np.generic) else x


class UpdateCodec(abc.ABC):
    """Encodes ``new`` relative to ``base`` as a ``Payload``; decodes it back given the base.

    Subclasses set ``name``, ``exact``, ``reference_url``, ``params`` (the schema) and implement
    ``_encode`` / ``_decode``. ``encode`` validates parameters and inputs first; ``decode`` checks
    that the payload was made by this codec for a tensor of the base's shape and dtype.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    reference_url: ClassVar[str | None] = None
    params: ClassVar[tuple[Param, ...]] = ()

    def resolve_params(self, params: Mapping[str, object]) -> dict[str, ParamValue]:
        """Defaults overlaid with ``params``, each checked; unknown names are a ``UserError``."""
        specs = {p.name: p for p in self.params}
        unknown = sorted(set(params) - set(specs))
        if unknown:
            valid = "; ".join(p.describe() for p in self.params) or "(none)"
            raise UserError(
                f"unknown parameter {unknown[0]!r} for codec {self.name!r}",
                hint=f"valid parameters: {valid}",
                codec=self.name,
                known=sorted(specs),
            )
        return {
            n: spec.convert(params[n], self.name) if n in params else spec.default
            for n, spec in specs.items()
        }

    def encode(
        self, new: np.ndarray, base: np.ndarray, *, name: str, seed: int, **params: object
    ) -> Payload:
        """Encode ``new`` against ``base`` for tensor ``name``; ``seed`` keys any randomness."""
        return self._payload(new, base, name, seed, params, None, None)

    def encode_blocked(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        block: int | None,
        done: Done | None = None,
        **params: object,
    ) -> Payload:
        """``encode``'s payload, bit for bit, reading the inputs about ``block`` bytes at a time
        when the codec ``streams`` (memory: a few blocks plus the payload); ``done(start, stop)``
        gets each byte range of the inputs it no longer needs. Other codecs (and ``block=None``)
        encode the whole tensor at once."""
        return self._payload(new, base, name, seed, params, block, done)

    def _payload(
        self,
        new: np.ndarray,
        base: np.ndarray,
        name: str,
        seed: int,
        params: Mapping[str, object],
        block: int | None,
        done: Done | None,
    ) -> Payload:
        resolved = self.resolve_params(params)
        new, base = _as_array(new), _as_array(base)
        dtype_name = check_pair(new, base, codec=self.name, name=name)
        if block is not None and self.streams:
            arrays, meta, error = self._encode_blocked(new, base, resolved, block, done)
        else:
            arrays, meta, error = self._encode(new, base, name=name, seed=seed, params=resolved)
        full_meta = tensor_meta(base.shape, dtype_name)
        full_meta.update(resolved)
        full_meta.update(meta)
        return Payload(codec=self.name, arrays=arrays, meta=full_meta, error=error)

    def decode_blocks(
        self, payload: Payload, base: np.ndarray, *, block: int, done: Done | None = None
    ) -> Iterator[np.ndarray]:
        """``decode``'s result as flat (1-D) arrays of the base's dtype, about ``block`` bytes
        each, in order, when the codec ``streams`` (one whole flat array otherwise); ``done``
        gets each byte range of the base it no longer needs."""
        self._check_decodable(payload, base)
        if self.streams:
            yield from self._decode_blocks(payload, _as_array(base), block, done)
        else:
            yield self._decode(payload, _as_array(base)).reshape(-1)

    def decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        """Rebuild the tensor from ``payload`` and ``base``; same dtype and shape as the base."""
        self._check_decodable(payload, base)
        return self._decode(payload, _as_array(base))

    def _check_decodable(self, payload: Payload, base: np.ndarray) -> None:
        if payload.codec != self.name:
            raise UserError(
                f"codec {self.name!r} cannot decode a {payload.codec!r} payload",
                hint="decode with the codec named in the payload",
            )
        base = _as_array(base)
        if not isinstance(base, np.ndarray):
            raise UserError(f"{self.name}: base is a {type(base).__name__}, not an array")
        want = (payload.meta.get("shape"), payload.meta.get("dtype"))
        got = (shape_text(base.shape), from_numpy(base.dtype))
        if want != got:
            raise UserError(
                f"{self.name} payload was made for a {want[1]} tensor of shape {want[0]}, "
                f"but the base is {got[1]} {got[0]}",
                hint="decode against the base the patch was made from",
            )

    #: Whether ``encode_blocked``/``decode_blocks`` work block by block (exact codecs); the
    #: others hold the whole tensor (low-rank needs the matrix, top-k the global order).
    streams: ClassVar[bool] = False

    def _encode_blocked(
        self,
        new: np.ndarray,
        base: np.ndarray,
        params: dict[str, ParamValue],
        block: int,
        done: Done | None,
    ) -> tuple[Arrays, Meta, ErrorReport | None]:
        """``_encode``'s result from ``block``-byte pieces (codecs that ``stream``)."""
        raise NotImplementedError(self.name)

    def _decode_blocks(
        self, payload: Payload, base: np.ndarray, block: int, done: Done | None
    ) -> Iterator[np.ndarray]:
        """``_decode``'s result as flat pieces (codecs that ``stream``)."""
        raise NotImplementedError(self.name)

    @abc.abstractmethod
    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, ErrorReport | None]:
        """Arrays, extra meta and error of a validated (new, base) pair."""

    @abc.abstractmethod
    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        """The tensor rebuilt from a payload already checked against ``base``."""


class LossyCodec(UpdateCodec):
    """A codec approximating the float delta Δ = new − base in a compute dtype.

    Δ is computed in float64 for F64 tensors and float32 otherwise; non-float tensors and
    non-finite deltas are refused. Subclasses implement ``_approximate`` (Δ → arrays, meta, kept
    fraction) and ``_delta_hat`` (payload → Δ̂); the error is measured on exactly the Δ̂ that
    ``decode`` adds to the base.
    """

    exact: ClassVar[bool] = False

    def _encode(
        self,
        new: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, ErrorReport | None]:
        ct = compute_dtype(from_numpy(base.dtype), codec=self.name, name=name)
        base_ct = base.astype(ct)
        delta = new.astype(ct) - base_ct
        if not np.all(np.isfinite(delta)):
            raise UserError(
                f"codec {self.name!r}: the delta of {name!r} has NaN or infinite values",
                hint="use exact_xor, exact_sparse or full for tensors with non-finite values",
                name=name,
            )
        arrays, meta, kept = self._approximate(delta, base_ct, name=name, seed=seed, params=params)
        probe = Payload(self.name, arrays, {**params, **meta, "shape": shape_text(base.shape)})
        approx = self._delta_hat(probe, base_ct)
        return arrays, meta, error_report(delta, approx, kept)

    def _decode(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        ct = compute_dtype(from_numpy(base.dtype), codec=self.name, name="<payload>")
        base_ct = base.astype(ct)
        out: np.ndarray = (base_ct + self._delta_hat(payload, base_ct)).astype(base.dtype)
        return out

    @abc.abstractmethod
    def _approximate(
        self,
        delta: np.ndarray,
        base: np.ndarray,
        *,
        name: str,
        seed: int,
        params: dict[str, ParamValue],
    ) -> tuple[Arrays, Meta, float]:
        """Payload arrays, extra meta and kept fraction of Δ (``base`` in the compute dtype)."""

    @abc.abstractmethod
    def _delta_hat(self, payload: Payload, base: np.ndarray) -> np.ndarray:
        """The reconstructed delta, in the compute dtype and the base's shape."""


__all__ = [
    "PAYLOAD_VERSION",
    "PLAIN_DTYPES",
    "ErrorReport",
    "LossyCodec",
    "Payload",
    "UpdateCodec",
    "payload_nbytes",
    "payloads_equal",
    "stable_key",
    "tensor_generator",
    "tensor_meta",
]
