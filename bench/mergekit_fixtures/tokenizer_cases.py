"""Tokenizer fixtures: tiny models with different vocabularies, merged by mergekit with
``tokenizer_source`` / ``tokenizer:`` (``tests/fixtures/mergekit/tokenizer/``).

``models/{base,ft1,ft2}``: Llama-shaped (hidden 8, 1 layer), each with a WordLevel
``tokenizer.json`` built offline with the ``tokenizers`` package:

* ``base``: ``[UNK]``, ``[PAD]`` and ``w0`` … ``w13`` (16 tokens);
* ``ft1``: the base's tokens in another order, then ``x1`` and ``shared`` (18);
* ``ft2``: the base's tokens but ``w10`` … ``w13``, then ``x2``, ``shared``, ``y2`` (15).

So the union has tokens only ft1 has (``x1``), only ft2 has (``x2``, ``y2``), two fine-tunes
but not the base have (``shared``: their average) and base tokens ft2 lacks (the base's row).
Rows of tokens a model shares with the base are the base's row plus an exact float32 delta (as
in ``__main__``), every other row is drawn fresh. Each case keeps mergekit's tensors,
``config.json`` and ``tokenizer.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bench.common.llama import llama_config, llama_shapes

SPECIALS = ["[UNK]", "[PAD]"]
WORDS = [f"w{i}" for i in range(14)]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTER = 8, 1, 2, 1, 12


def vocabularies(rng: np.random.Generator) -> dict[str, list[str]]:
    """Token lists in id order per model."""
    shuffled = [WORDS[i] for i in rng.permutation(len(WORDS))]
    return {
        "base": SPECIALS + WORDS,
        "ft1": SPECIALS + shuffled + ["x1", "shared"],
        "ft2": SPECIALS + WORDS[:10] + ["x2", "shared", "y2"],
    }


def write_tokenizer(path: Path, tokens: list[str]) -> None:
    """A WordLevel ``tokenizer.json`` (whitespace pre-tokenizer) and its ``tokenizer_config``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()  # type: ignore[assignment]
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "pad_token": "[PAD]"}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def make_models(root: Path, seed: int = 7) -> None:
    """Write ``root/{base,ft1,ft2}``: weights, ``config.json`` and tokenizer files."""
    from bench.mergekit_fixtures.__main__ import exact_finetune, make_base, write_model

    rng = np.random.default_rng(seed)
    vocabs = vocabularies(rng)
    shapes = llama_shapes(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, len(vocabs["base"]))
    base = make_base(rng, shapes)
    rows = {t: i for i, t in enumerate(vocabs["base"])}
    for key, tokens in vocabs.items():
        out: dict[str, Any] = {}
        for name, b in base.items():
            if key == "base":
                out[name] = b
            elif name in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = _vocab_rows(rng, b, rows, tokens)
            else:
                out[name] = exact_finetune(b, rng.normal(0.0, 0.01, size=b.shape))
        cfg = llama_config(HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, len(tokens), max_positions=32)
        write_model(root / key, out, {**cfg, "torch_dtype": "float32"})
        write_tokenizer(root / key, tokens)


def _vocab_rows(
    rng: np.random.Generator, base: np.ndarray, rows: dict[str, int], tokens: list[str]
) -> np.ndarray:
    """One fine-tune's embedding: base row + exact delta for shared tokens, fresh rows else."""
    from bench.mergekit_fixtures.__main__ import exact_finetune, on_grid

    out = np.empty((len(tokens), base.shape[1]), dtype=np.float32)
    for i, tok in enumerate(tokens):
        if tok in rows:
            b = base[rows[tok]]
            out[i] = exact_finetune(b, rng.normal(0.0, 0.01, size=b.shape))
        else:
            out[i] = on_grid(np.asarray(rng.normal(0.0, 0.02, size=base.shape[1])))
    return out


T = "../models/"
_TA = {
    "merge_method": "task_arithmetic",
    "base_model": T + "base",
    "models": [
        {"model": T + "ft1", "parameters": {"weight": 0.6}},
        {"model": T + "ft2", "parameters": {"weight": 0.4}},
    ],
    "dtype": "float32",
}

CASES: dict[str, dict[str, Any]] = {
    "union": {**_TA, "tokenizer_source": "union"},
    "base": {**_TA, "tokenizer_source": "base"},
    "model": {**_TA, "tokenizer_source": T + "ft2"},
    "union_pad": {**_TA, "tokenizer": {"source": "union", "pad_to_multiple_of": 8}},
}


def build(root: Path, run_mergekit: Any, only: list[str] | None) -> None:
    """Models, then every case (or those in ``only``) under ``root`` (``…/tokenizer``)."""
    import yaml

    make_models(root / "models")
    for name in only or list(CASES):
        case_dir = root / name
        case_dir.mkdir(parents=True, exist_ok=True)
        (case_dir / "config.yaml").write_text(yaml.safe_dump(CASES[name], sort_keys=False))
        run_mergekit(case_dir)  # keeps mergekit's tokenizer.json as mergekit-tokenizer.json
