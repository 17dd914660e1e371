"""Counter-based randomness keyed by (seed, model index, tensor name).

Each (seed, model, tensor) triple gets its own Philox stream, so a random mask depends only on its
key: not on how many threads merge, in which order tensors are visited, or what ran before.
"""

from __future__ import annotations

import hashlib

import numpy as np


def philox_key(seed: int, model_index: int, tensor_name: str) -> int:
    """The 128-bit Philox key: blake2b-128 of ``f"{seed}/{model_index}/{tensor_name}"``."""
    text = f"{int(seed)}/{int(model_index)}/{tensor_name}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=16).digest(), "little")


def keyed_generator(seed: int, model_index: int, tensor_name: str) -> np.random.Generator:
    """A fresh ``Generator(Philox(key=...))`` for one model's tensor (see the module docstring)."""
    return np.random.Generator(np.random.Philox(key=philox_key(seed, model_index, tensor_name)))
