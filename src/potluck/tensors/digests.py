"""Content digests of tensors and JSON values: the identities patches, statistics files and
expert libraries pin. Pure numpy and hashlib."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

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
