"""Helpers for the modular tests: expert patches built from known factors (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from potluck.codecs import Payload, get_codec
from potluck.codecs.base import PAYLOAD_VERSION, shape_text
from potluck.formats.safetensors import write_safetensors
from potluck.ops.models.sources import open_path
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy


def lowrank_payload(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> Payload:
    meta = {
        "version": PAYLOAD_VERSION,
        "shape": shape_text(shape),
        "dtype": "F32",
        **get_codec("lowrank").resolve_params({"rank": a.shape[0]}),
        "mode": "factors",
        "kept_rank": int(a.shape[0]),
        "randomized": 0,
    }
    arrays = {"lora_A": a.astype(np.float32), "lora_B": b.astype(np.float32)}
    return Payload("lowrank", arrays, meta, None)


def dense_payload(delta: np.ndarray) -> Payload:
    meta = {
        "version": PAYLOAD_VERSION,
        "shape": shape_text(delta.shape),
        "dtype": "F32",
        **get_codec("lowrank").resolve_params({}),
        "mode": "dense",
        "kept_rank": 0,
    }
    return Payload("lowrank", {"delta": delta.astype(np.float32)}, meta, None)


def ia3_payload(scales: np.ndarray, shape: tuple[int, ...], axis: int) -> Payload:
    meta = {"version": PAYLOAD_VERSION, "shape": shape_text(shape), "dtype": "F32", "axis": axis}
    return Payload("ia3", {"scales": scales.astype(np.float32)}, meta, None)


def write_expert(
    base: Path | str,
    out: Path,
    payloads: dict[str, Payload],
    description: dict[str, object] | None = None,
) -> Path:
    """A patch of ``base`` with these payloads, pinned to the base's tensor hashes."""
    with open_path(base) as src:
        pins = {name: tensor_sha256(src.read(name)) for name in payloads}
    write_patch(out, PatchContents(payloads, pins, {}, [], [], description or {}))
    return out


def save_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    specs = [(n, from_numpy(a.dtype), tuple(a.shape)) for n, a in tensors.items()]
    write_safetensors(path, specs, list(tensors.values()))
    return path


def random_factors(
    rng: np.random.Generator, r: int, n_in: int, n_out: int, scale: float = 0.3
) -> tuple[np.ndarray, np.ndarray]:
    a = (rng.normal(size=(r, n_in)) * scale).astype(np.float32)
    b = (rng.normal(size=(n_out, r)) * scale).astype(np.float32)
    return a, b
