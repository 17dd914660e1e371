"""Update codecs: encode a fine-tuned tensor as a small payload against a pinned base.

``CODECS`` holds the built-ins; third-party codecs register through the ``potluck.codecs``
entry-point group. Exact: ``full``, ``exact_xor``, ``exact_sparse``. Lossy (each reports an
``ErrorReport``): ``sparse_topk``, ``sparse_threshold``, ``dare``, ``ternary``, ``bitdelta``,
``quant``, ``lowrank``, ``qlowrank``, ``ia3``. ``factors_payload`` and ``dense_payload``
(``lowrank``) and ``scales_payload`` (``ia3``) build payloads from factors, deltas or scales
computed elsewhere (an imported adapter, a fixed mixture of experts).
"""

from __future__ import annotations

import numpy as np

from potluck.codecs.base import (
    PLAIN_DTYPES,
    ErrorReport,
    LossyCodec,
    Payload,
    UpdateCodec,
    full_nbytes,
    payload_nbytes,
    payload_shape_dtype,
    payloads_equal,
)
from potluck.codecs.exact import ExactSparseCodec, ExactXorCodec, FullCodec
from potluck.codecs.ia3 import IA3Codec, scales_payload
from potluck.codecs.lowrank import LowRankCodec, dense_payload, factors_payload
from potluck.codecs.mask import TaskMaskCodec
from potluck.codecs.qlowrank import QLowRankCodec
from potluck.codecs.quant import QuantCodec
from potluck.codecs.rules import DEFAULT_RULES, choose_codec
from potluck.codecs.sign import BitDeltaCodec, SignScaledCodec, TernaryCodec
from potluck.codecs.sparse import DareCodec, ThresholdCodec, TopKCodec
from potluck.params import Param
from potluck.registry import Registry
from potluck.tensors.dtypes import to_numpy

__all__ = [
    "CODECS",
    "DEFAULT_RULES",
    "PLAIN_DTYPES",
    "ErrorReport",
    "LossyCodec",
    "Param",
    "Payload",
    "SignScaledCodec",
    "UpdateCodec",
    "choose_codec",
    "decode_payload",
    "dense_payload",
    "factors_payload",
    "full_nbytes",
    "get_codec",
    "payload_nbytes",
    "payload_shape_dtype",
    "payloads_equal",
    "scales_payload",
]

CODECS: Registry[UpdateCodec] = Registry("update codec", "potluck.codecs")
for _codec in (
    FullCodec(),
    ExactXorCodec(),
    ExactSparseCodec(),
    TopKCodec(),
    ThresholdCodec(),
    DareCodec(),
    TernaryCodec(),
    BitDeltaCodec(),
    QuantCodec(),
    LowRankCodec(),
    QLowRankCodec(),
    IA3Codec(),
    TaskMaskCodec(),
):
    CODECS.register(_codec.name, _codec)
del _codec


def get_codec(name: str) -> UpdateCodec:
    """The codec registered as ``name``; a ``UserError`` lists the known codecs."""
    return CODECS.get(name)


def decode_payload(payload: Payload, base: np.ndarray | None) -> np.ndarray:
    """The tensor a payload rebuilds from ``base`` (``full`` payloads ignore it; None allowed)."""
    codec = CODECS.get(payload.codec)
    if payload.codec == "full" or base is None:
        shape, dtype = payload_shape_dtype(payload)
        return codec.decode(payload, np.zeros(shape, to_numpy(dtype)))
    return codec.decode(payload, base)
