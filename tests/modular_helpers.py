"""Helpers for the modular tests: expert patches built from known factors (the reference)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from potluck.codecs import Payload, ia3, lowrank
from potluck.formats.safetensors import write_safetensors
from potluck.ops.models.sources import open_path
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy


def lowrank_payload(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> Payload:
    return lowrank.factors_payload(
        b.astype(np.float32), a.astype(np.float32), shape=shape, dtype="F32"
    )


def dense_payload(delta: np.ndarray) -> Payload:
    return lowrank.dense_payload(delta.astype(np.float32), shape=delta.shape, dtype="F32")


def ia3_payload(scales: np.ndarray, shape: tuple[int, ...], axis: int) -> Payload:
    return ia3.scales_payload(scales.astype(np.float32), axis, shape=shape, dtype="F32")


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
