"""``stack_patches``: compose patches P1, P2, … (each made against the previous one's result).

Parts are folded left to right. For a tensor only one part touches, that part's payload is
carried over unchanged. For a tensor several parts touch, part k must have been made against the
result of the parts before it: where the previous result is exact, its recorded result hash
must equal part k's pinned base hash (else the stack is refused, naming the tensor).

Payload-domain composition (no base needed, result exact whenever the later part is exact):

* anything then ``full`` → the later ``full`` payload;
* ``full`` then anything → ``full`` holding the later payload decoded against the earlier values;
* ``exact_xor`` then ``exact_xor`` → one ``exact_xor`` payload holding the XOR of both XORs;
* ``exact_sparse`` then ``exact_sparse`` → the union of positions, later values winning.

Every other pair (a lossy part followed by anything, or mixed exact codecs) needs the base:
with ``base`` given, the tensor is materialised exactly as applying the parts one by one would
(base → part 1 → part 2 …, each intermediate checked against the next part's pinned hash) and the
final tensor is re-encoded against the base with the codec chosen by ``rules`` /
``default_codec`` (default ``exact_xor``: the stack then reproduces the step-by-step result bit
for bit). A lossy re-encoding reports its error relative to that step-by-step result. Without
``base`` such a stack is refused with a message naming the tensor.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import CODECS, Payload, decode_payload, get_codec, payload_shape_dtype
from potluck.codecs.bits import bit_view, decode_positions, encode_positions, from_bit_view
from potluck.codecs.rules import Rule
from potluck.errors import IntegrityError, UserError
from potluck.fileio import file_sha256
from potluck.ops.models.sources import ModelInput, ModelSource, open_input
from potluck.ops.patch.create import encode_tensor
from potluck.ops.patch.fileformat import PatchContents, read_patch, write_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import to_numpy

__all__ = ["StackReport", "stack_patches"]

_ORDER_HINT = "stack patches in the order they were made: each must be created against the result "
_ORDER_HINT += "of the ones before it"


@dataclass
class StackReport:
    """What ``stack_patches`` wrote.

    ``composed`` maps each tensor touched by several parts to ``"payload"`` (composed without
    the base) or ``"materialised"`` (rebuilt from the base and re-encoded); ``errors`` holds the
    relative error of lossy re-encodings against the step-by-step result.
    """

    path: str
    size: int
    parts: list[str]
    exact: bool
    composed: dict[str, str] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    codecs: dict[str, str] = field(default_factory=dict)


def _incompatible(k: int, label: str, name: str, why: str) -> UserError:
    return UserError(
        f"part {k} ({label}) does not apply to the result of the parts before it: "
        f"tensor {name!r} {why}",
        hint=_ORDER_HINT,
        part=k,
        tensor=name,
    )


class _Stacker:
    """The fold state: the stacked patch so far and what materialising needs."""

    def __init__(
        self,
        base: ModelSource | None,
        rules: Sequence[Rule],
        default: tuple[str, Mapping[str, object]],
        seed: int,
    ) -> None:
        self.base = base
        self.rules = rules
        self.default = default
        self.seed = seed
        self.values: dict[str, np.ndarray] = {}  # step-by-step values of lossy re-encodings
        self.readded: set[str] = set()  # removed by one part, added again by a later one
        self.report_composed: dict[str, str] = {}
        self.errors: dict[str, float] = {}
        self.checked: set[str] = set()

    def base_tensor(self, name: str, want: str, k: int, label: str) -> np.ndarray:
        """The base's tensor ``name``, checked against the pinned hash once."""
        assert self.base is not None
        if name not in self.base.infos:
            raise _incompatible(
                k, label, name, f"is pinned but {self.base.label} has no such tensor"
            )
        arr = self.base.read(name)
        if name not in self.checked:
            if tensor_sha256(arr) != want:
                raise IntegrityError(
                    f"{self.base.label} is not the base of this stack: tensor {name!r} differs "
                    f"from the hash part {k} ({label}) pins",
                    hint="pass the checkpoint the first patch was made from as --base",
                    tensor=name,
                )
            self.checked.add(name)
        return arr

    def fold(self, acc: PatchContents, nxt: PatchContents, k: int, label: str) -> PatchContents:
        """``acc`` followed by ``nxt`` (part number ``k``)."""
        out = PatchContents(
            dict(acc.payloads), dict(acc.base), dict(acc.result), list(acc.added), list(acc.removed)
        )
        for name in sorted(nxt.base):
            if name in acc.removed:
                raise _incompatible(k, label, name, "was removed by an earlier part")
            if name in acc.payloads:
                self._compose(out, acc, nxt, name, k, label)
                continue
            if self.base is not None:
                self.base_tensor(name, nxt.base[name], k, label)
            out.payloads[name] = nxt.payloads[name]
            out.base[name] = nxt.base[name]
            _set_result(out, name, nxt.result.get(name))
        for name in sorted(set(nxt.payloads) - set(nxt.base)):
            self._add(out, acc, nxt, name, k, label)
        for name in sorted(nxt.removed):
            self._remove(out, acc, name, k, label)
        return out

    def _add(
        self,
        out: PatchContents,
        acc: PatchContents,
        nxt: PatchContents,
        name: str,
        k: int,
        label: str,
    ) -> None:
        if name in acc.payloads:
            raise _incompatible(k, label, name, "is added, but an earlier part already has it")
        out.payloads[name] = nxt.payloads[name]
        _set_result(out, name, nxt.result.get(name))
        if name in out.removed:
            out.removed.remove(name)
            self.readded.add(name)
        if name not in out.added:
            out.added.append(name)

    def _remove(
        self, out: PatchContents, acc: PatchContents, name: str, k: int, label: str
    ) -> None:
        if name in acc.removed:
            raise _incompatible(k, label, name, "is removed, but an earlier part removed it")
        in_base = name in acc.base or name in self.readded or name not in acc.payloads
        out.payloads.pop(name, None)
        out.result.pop(name, None)
        out.base.pop(name, None)
        self.values.pop(name, None)
        if name in out.added:
            out.added.remove(name)
        if in_base:
            out.removed.append(name)

    def _compose(
        self,
        out: PatchContents,
        acc: PatchContents,
        nxt: PatchContents,
        name: str,
        k: int,
        label: str,
    ) -> None:
        pa, pb = acc.payloads[name], nxt.payloads[name]
        inter = acc.result.get(name)
        if inter is not None and inter != nxt.base[name]:
            raise _incompatible(
                k,
                label,
                name,
                f"is pinned to {nxt.base[name][:12]}…, but the earlier result is {inter[:12]}…",
            )
        composed = _payload_compose(name, pa, pb, nxt.result.get(name)) if inter else None
        if composed is None:
            composed = self._materialise(name, acc, nxt, k, label)
            self.report_composed[name] = "materialised"
        else:
            self.values.pop(name, None)
            self.report_composed[name] = "payload"
        out.payloads[name] = composed[0]
        _set_result(out, name, composed[1])

    def _materialise(
        self, name: str, acc: PatchContents, nxt: PatchContents, k: int, label: str
    ) -> tuple[Payload, str | None]:
        pa, pb = acc.payloads[name], nxt.payloads[name]
        if self.base is None:
            raise UserError(
                f"cannot stack tensor {name!r} ({pa.codec} then {pb.codec}) without the base",
                hint="pass --base BASE (the checkpoint the first patch was made from); the "
                "tensor is then rebuilt step by step and re-encoded",
                tensor=name,
            )
        pinned = acc.base.get(name)
        if pinned is None:  # pragma: no cover - added tensors are `full`, composed above
            raise _incompatible(k, label, name, "has no pinned base hash to rebuild it from")
        base = self.base_tensor(name, pinned, k, label)
        current = self.values.get(name)
        if current is None:
            current = decode_payload(pa, base)
        if tensor_sha256(current) != nxt.base[name]:
            raise _incompatible(k, label, name, "differs from what the earlier parts produce")
        final = decode_payload(pb, current)
        payload = encode_tensor(name, base, final, self.rules, self.default, self.seed)
        if CODECS.get(payload.codec).exact:
            self.values.pop(name, None)
            self.errors.pop(name, None)
            return payload, tensor_sha256(final)
        self.values[name] = final
        self.errors[name] = 0.0 if payload.error is None else payload.error.relative_error
        return payload, None


def _set_result(out: PatchContents, name: str, value: str | None) -> None:
    if value is None:
        out.result.pop(name, None)
    else:
        out.result[name] = value


def _payload_compose(
    name: str, pa: Payload, pb: Payload, result: str | None
) -> tuple[Payload, str | None] | None:
    """``pa`` then ``pb`` as one payload against pa's base, or None when that needs the base."""
    if pb.codec == "full":
        return pb, result
    if pa.codec == "full":
        final = decode_payload(pb, decode_payload(pa, None))
        full = get_codec("full").encode(final, np.zeros_like(final), name=name, seed=0)
        return full, tensor_sha256(final)
    if pa.codec == pb.codec == "exact_xor":
        return _xor_compose(name, pa, pb), result
    if pa.codec == pb.codec == "exact_sparse":
        return _sparse_compose(pa, pb), result
    return None


def _xor_compose(name: str, pa: Payload, pb: Payload) -> Payload:
    shape, dtype = payload_shape_dtype(pa)
    zeros = np.zeros(shape, to_numpy(dtype))
    codec = get_codec("exact_xor")
    xa, xb = codec.decode(pa, zeros), codec.decode(pb, zeros)  # against zeros: the XOR itself
    both = from_bit_view(bit_view(xa) ^ bit_view(xb), zeros.dtype, shape)
    return codec.encode(both, zeros, name=name, seed=0, level=pb.meta.get("level", 3))


def _sparse_compose(pa: Payload, pb: Payload) -> Payload:
    shape, _dtype = payload_shape_dtype(pa)
    size = int(np.prod(shape, dtype=np.int64))
    pos = [decode_positions(p.arrays["positions"], size, p.codec) for p in (pa, pb)]
    positions = np.concatenate(pos)
    values = np.concatenate([pa.arrays["values"], pb.arrays["values"]])
    # keep the last occurrence of each position (the later part wins)
    uniq, first_rev = np.unique(positions[::-1], return_index=True)
    keep = values[::-1][first_rev]
    arrays = {"positions": encode_positions(uniq), "values": np.ascontiguousarray(keep)}
    return Payload("exact_sparse", arrays, {**pb.meta, "changed": int(uniq.size)}, None)


def stack_patches(
    parts: Sequence[str | os.PathLike[str]],
    out_path: str | os.PathLike[str],
    *,
    base: ModelInput | None = None,
    rules: Sequence[Rule] = (),
    default_codec: str = "exact_xor",
    params: Mapping[str, object] | None = None,
    seed: int = 0,
    description: Mapping[str, Any] | None = None,
) -> StackReport:
    """Compose the patches ``parts`` (in order) into one patch at ``out_path``.

    See the module docstring for what composes without ``base`` and how materialised tensors
    are re-encoded (``rules``, ``default_codec``, ``params``, ``seed`` as in ``create_patch``).
    Nothing is written when a part does not apply to the result of the ones before it.
    """
    if not parts:
        raise UserError("nothing to stack", hint="give at least one patch")
    CODECS.get(default_codec)
    contents = [read_patch(p) for p in parts]
    shas = [file_sha256(p) for p in parts]
    with ExitStack() as stack:
        src = None if base is None else open_input(base, stack)
        stacker = _Stacker(src, rules, (default_codec, dict(params or {})), seed)
        acc = contents[0]
        for k, (nxt, path) in enumerate(zip(contents[1:], parts[1:], strict=True), start=2):
            acc = stacker.fold(acc, nxt, k, str(path))
    acc.added = sorted(acc.added)
    acc.removed = sorted(acc.removed)
    acc.description = {
        **dict(description or {}),
        "stack": [
            {"sha256": s, "description": c.description} for s, c in zip(shas, contents, strict=True)
        ],
    }
    size = write_patch(out_path, acc)
    return StackReport(
        path=str(Path(out_path)),
        size=size,
        parts=shas,
        exact=all(CODECS.get(p.codec).exact for p in acc.payloads.values()),
        composed=dict(sorted(stacker.report_composed.items())),
        errors=dict(sorted(stacker.errors.items())),
        codecs={n: p.codec for n, p in sorted(acc.payloads.items())},
    )
