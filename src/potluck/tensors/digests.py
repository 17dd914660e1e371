"""Content digests of tensors and JSON values: the identities patches, statistics files and
expert libraries pin. Pure numpy and hashlib."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence

import numpy as np


def tensor_sha256(arr: np.ndarray) -> str:
    """Identity of a tensor: sha256 of its exact little-endian C-order bytes."""
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def canonical_json(value: object) -> str:
    """Compact JSON with sorted keys (the only JSON spelling a patch uses)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def base_digest(base: Mapping[str, str]) -> str:
    """sha256 of the canonical JSON of a {tensor name: sha256} dict."""
    return hashlib.sha256(canonical_json(dict(base)).encode("utf-8")).hexdigest()


def weights_digest(tensors: Mapping[str, tuple[str, Sequence[int], str]]) -> str:
    """Identity of a model's weights whatever the file format or sharding.

    ``tensors`` maps each tensor name to ``(dtype, shape, sha256 of its little-endian C-order
    bytes)`` (dtype spelled as safetensors does: ``F32``, ``BF16``, ...). The digest is the sha256
    of the canonical JSON ``{"potluck_weights": "1", "tensors": {name: [dtype, shape, sha]}}``,
    so two files holding the same named tensors have one digest, however they are split.
    """
    doc = {
        "potluck_weights": "1",
        "tensors": {n: [d, [int(x) for x in s], h] for n, (d, s, h) in sorted(tensors.items())},
    }
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()
