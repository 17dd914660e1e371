"""Tiny random-init Hugging Face models for the tests (configs in code, no downloads).

Every builder seeds torch's global generator just before it builds the model, so one call
always gives the same weights: the tests compare against references computed from them.
Keyword arguments are passed to the transformers config as they are; the defaults are the
small sizes most tests use. Models come back in eval mode. ``save_tiny`` writes one with
``save_pretrained`` (and, given ``words``, a word-level tokenizer beside it).

Torch, transformers and tokenizers are imported when a builder runs; a test that calls one
without them is skipped, as with ``pytest.importorskip``.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

#: A small word-level vocabulary (padding, unknown, six words) for text-classification tests.
MOVIE_WORDS = ["<pad>", "<unk>", "good", "bad", "movie", "plot", "the", "was"]


def _require(module: str) -> Any:
    """The module, or a skipped test without it (pytest itself imported only then)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        import pytest

        pytest.skip(f"{module} is not installed", allow_module_level=True)


def _transformers() -> Any:
    return _require("transformers")


def _build(model_class: str, config: Any, seed: int) -> Any:
    _require("torch").manual_seed(seed)
    return getattr(_transformers(), model_class)(config).eval()


def tiny_bert(
    seed: int,
    *,
    vocab_size: int,
    classifier: bool = False,
    hidden_size: int = 16,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 16,
    **config: Any,
) -> Any:
    """A random ``BertModel`` (``BertForSequenceClassification`` when ``classifier``);
    ``intermediate_size`` defaults to twice ``hidden_size``."""
    cfg = _transformers().BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size or 2 * hidden_size,
        max_position_embeddings=max_position_embeddings,
        **config,
    )
    cls = "BertForSequenceClassification" if classifier else "BertModel"
    return _build(cls, cfg, seed)


def tiny_llama(
    seed: int,
    *,
    vocab_size: int,
    classifier: bool = False,
    hidden_size: int = 8,
    num_hidden_layers: int = 1,
    num_attention_heads: int = 2,
    num_key_value_heads: int | None = None,
    intermediate_size: int | None = None,
    **config: Any,
) -> Any:
    """A random ``LlamaForCausalLM`` (``LlamaForSequenceClassification`` when ``classifier``);
    ``intermediate_size`` defaults to twice ``hidden_size``, ``num_key_value_heads`` to
    ``num_attention_heads``."""
    cfg = _transformers().LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads or num_attention_heads,
        **config,
    )
    cls = "LlamaForSequenceClassification" if classifier else "LlamaForCausalLM"
    return _build(cls, cfg, seed)


def tiny_gpt2(
    seed: int,
    *,
    vocab_size: int,
    n_positions: int = 32,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    **config: Any,
) -> Any:
    """A random ``GPT2LMHeadModel``."""
    cfg = _transformers().GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        **config,
    )
    return _build("GPT2LMHeadModel", cfg, seed)


def save_word_tokenizer(path: Path, words: list[str]) -> Path:
    """A whitespace word-level fast tokenizer over ``words`` (token id = position), saved in
    ``path``; ``words[0]`` is the padding token and ``words[1]`` the unknown one."""
    tokenizers = _require("tokenizers")
    pad, unk = words[0], words[1]
    vocab = {w: i for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = _transformers().PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=pad, unk_token=unk
    )
    fast.save_pretrained(path)
    return path


def save_tiny(model: Any, path: Path, words: list[str] | None = None, **save_kw: Any) -> Path:
    """``model.save_pretrained(path, **save_kw)``, and a word tokenizer when ``words`` is given."""
    model.save_pretrained(path, **save_kw)
    if words is not None:
        save_word_tokenizer(path, words)
    return path
