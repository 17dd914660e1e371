"""LoRA contributors of bench.quality (``bench.minilm.finetune``): folding and cache keys.

References: a naive triple loop for W + scale·B·A; the wrapped (unfolded) model's own forward
pass for the folded encoder; the unchanged base weights when B = 0; the pre-LoRA field list for
the cache key of full fine-tunes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.common import finetune
from tiny_models import tiny_bert

torch = pytest.importorskip("torch")
torch.set_num_threads(2)
transformers = pytest.importorskip("transformers")

#: FinetuneConfig's fields before the LoRA option (what full fine-tune keys hash).
OLD_FIELDS = ["task", "seed", "steps", "batch_size", "lr", "head_lr", "weight_decay", "warmup",
              "max_length", "threads"]  # fmt: skip


def _naive_fold(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    out = w.copy()
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            out[i, j] += scale * sum(b[i, k] * a[k, j] for k in range(a.shape[0]))
    return out


def test_fold_lora_matches_naive_loop() -> None:
    rng = np.random.default_rng(0)
    w, a, b = rng.normal(size=(7, 5)), rng.normal(size=(3, 5)), rng.normal(size=(7, 3))
    got = finetune.fold_lora(torch.from_numpy(w), torch.from_numpy(a), torch.from_numpy(b), 2.0)
    np.testing.assert_allclose(got.numpy(), _naive_fold(w, a, b, 2.0), rtol=1e-12, atol=1e-12)


def _state(m: object) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in m.state_dict().items()}  # type: ignore[attr-defined]


def test_lora_with_zero_b_is_the_base() -> None:
    base, enc = tiny_bert(1, vocab_size=50), tiny_bert(1, vocab_size=50)
    loras = finetune.add_lora(enc, rank=4, alpha=8.0)
    assert len(loras) == 2 * len(finetune.LORA_TARGETS)
    ids = torch.tensor([[1, 5, 7, 9, 2]])
    with torch.no_grad():
        np.testing.assert_array_equal(
            enc(input_ids=ids).last_hidden_state.numpy(),
            base(input_ids=ids).last_hidden_state.numpy(),  # type: ignore[operator]
        )
    finetune.merge_lora(enc, loras)
    want, got = _state(base), _state(enc)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_folded_encoder_equals_base_plus_scaled_ba_and_the_wrapped_forward() -> None:
    base, enc = tiny_bert(2, vocab_size=50), tiny_bert(2, vocab_size=50)
    loras = finetune.add_lora(enc, rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for lin in loras.values():
            lin.lora_b.copy_(torch.randn(lin.lora_b.shape, generator=gen))
    factors = {m: (lin.lora_a.detach().numpy().copy(), lin.lora_b.detach().numpy().copy())
               for m, lin in loras.items()}  # fmt: skip
    ids = torch.tensor([[1, 5, 7, 9, 2], [3, 4, 8, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        wrapped = enc(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    finetune.merge_lora(enc, loras)
    want, got = _state(base), _state(enc)
    for k in want:
        module = k.removesuffix(".weight")
        if module in factors:
            a, b = factors[module]
            ref = _naive_fold(want[k].astype(np.float64), a, b, 8.0 / 4)
            np.testing.assert_allclose(got[k], ref, rtol=1e-5, atol=1e-5, err_msg=k)
        else:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert not any("lora" in k for k in got)
    with torch.no_grad():
        folded = enc(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    np.testing.assert_allclose(folded, wrapped, rtol=1e-4, atol=1e-5)


def test_full_finetune_keys_hash_the_old_fields_only() -> None:
    full = finetune.FinetuneConfig(task="vader_words", seed=1, steps=200, threads=2)
    assert list(full.key_fields()) == OLD_FIELDS
    assert full.key_fields() == {k: dataclasses.asdict(full)[k] for k in OLD_FIELDS}
    lora = finetune.lora_recipe("vader_words", 1)
    assert lora.lora_rank == 8 and lora.lora_alpha == 16.0 and lora.constant_lr
    assert {"lora_rank", "constant_lr"} <= set(lora.key_fields())
    assert lora.key() != full.key()


def test_constant_schedule_only_for_constant_lr() -> None:
    lora = finetune.lora_recipe("vader_words", 0)
    assert [finetune._schedule(s, lora) for s in (0, 10, 149)] == [1.0, 1.0, 1.0]
    full = finetune.FinetuneConfig(steps=100, warmup=0.1)
    assert finetune._schedule(0, full) == pytest.approx(0.1)
    assert finetune._schedule(55, full) == pytest.approx(0.5)
