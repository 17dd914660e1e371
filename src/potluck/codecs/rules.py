"""Per-tensor codec choice by name pattern."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from potluck.codecs.base import UpdateCodec
from potluck.errors import UserError
from potluck.params import ParamValue

Rule = tuple[str, str, Mapping[str, object]]

#: An example rule set: exact for norms, biases and embeddings, low rank for attention and MLP
#: matrices (Llama, GPT-2 and BERT names). Unmatched tensors get ``choose_codec``'s default
#: (``exact_xor``).
DEFAULT_RULES: list[Rule] = [
    ("*norm*", "exact_xor", {}),
    ("*LayerNorm*", "exact_xor", {}),
    ("*.ln_*", "exact_xor", {}),
    ("*.bias", "exact_xor", {}),
    ("*embed*", "exact_sparse", {}),
    ("*attn*", "lowrank", {"rank": 16}),
    ("*attention*", "lowrank", {"rank": 16}),
    ("*mlp*", "lowrank", {"rank": 32}),
    ("*intermediate.dense*", "lowrank", {"rank": 32}),
    ("*.output.dense*", "lowrank", {"rank": 32}),
]


def _resolve(rule: Rule, index: int) -> tuple[UpdateCodec, dict[str, ParamValue]]:
    from potluck.codecs import CODECS

    if not (isinstance(rule, tuple | list) and len(rule) == 3):
        raise UserError(
            f"codec rule #{index} is {rule!r}",
            hint="each rule is (name pattern, codec name, params dict)",
        )
    pattern, codec_name, params = rule
    if not isinstance(params, Mapping):
        raise UserError(
            f"codec rule #{index} ({pattern!r}): params must be a mapping, got {params!r}",
            hint="write {} for no parameters",
        )
    try:
        codec = CODECS.get(codec_name)
        return codec, codec.resolve_params(params)
    except UserError as e:
        raise UserError(
            f"codec rule #{index} ({pattern!r} → {codec_name!r}): {e.message}",
            hint=e.hint,
            **e.data,
        ) from e


def choose_codec(
    name: str,
    rules: Sequence[Rule],
    *,
    default: tuple[str, Mapping[str, object]] = ("exact_xor", {}),
) -> tuple[UpdateCodec, dict[str, ParamValue]]:
    """The codec and resolved parameters for tensor ``name``.

    ``rules`` are (fnmatch pattern, codec name, params), matched case-sensitively against the
    whole name; the first match wins, and ``default`` applies when none matches. Every rule is
    validated (codec exists, parameters valid) whatever the name, so a bad rule fails at once.
    """
    resolved = [_resolve(rule, i) for i, rule in enumerate(rules)]
    for (pattern, _codec, _params), choice in zip(rules, resolved, strict=True):
        if fnmatchcase(name, pattern):
            return choice
    return _resolve(("*", default[0], default[1]), len(rules))
