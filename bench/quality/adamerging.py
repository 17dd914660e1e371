"""AdaMerging (layer-wise) in bench.quality: λ learned with the bench's own forward.

potluck's ``--method adamerging`` learns λ on Hugging Face ``…ForSequenceClassification``
directories (BERT's CLS pooler). The contributors here are bare encoder files with a
``Linear(384, k)`` head on the **mean-pooled** embedding (``head.safetensors``: ``weight``,
``bias``), a bench convention with no potluck form. So the bench builds each task's forward
itself — the shipped BertModel under the merged tensors, attention-masked mean pooling, the
task's own head — and runs potluck's optimisation loop on it
(``potluck.ops.merge.adamerging.learn_layerwise``: entropy of each task's predictions, Adam, λ
clamped to [0, 1]). The learned λ go to ``run_merge`` as per-tensor ``weight`` conditions
(``weight_conditions``), which potluck merges without learning.

Unlabelled inputs: each task's **training** texts (the contributor's own data; labels never
read), never validation or test — validation picks the grid point, test scores it once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from bench.common import data, finetune, model

from .merges import Contributor
from .stages import MAX_LENGTH, log

#: Unlabelled examples per task (the first of its shuffled training split) and batch size.
MAX_SAMPLES = 256
BATCH_SIZE = 16


def unlabelled_batches(
    texts: Sequence[str], tokenizer: Any, batch_size: int, seed: int
) -> list[dict[str, Any]]:
    """``texts`` tokenised (no labels) in batches of similar length, batch order shuffled by
    ``seed`` (less padding than file order; every text once per pass)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    perm = np.random.default_rng(seed).permutation(len(groups))
    return [
        dict(
            tokenizer(
                [texts[j] for j in groups[g]],
                padding=True,
                truncation=True,
                max_length=MAX_LENGTH,
                return_tensors="pt",
            )
        )
        for g in perm
    ]


def _pooled_forward(encoder: Any, head: Any) -> Any:
    """forward(params, batch) → head(mean_pool(encoder_params(batch))): logits [B, k]."""
    import torch

    def forward(params: dict[str, Any], batch: dict[str, Any]) -> Any:
        out = torch.func.functional_call(encoder, params, args=(), kwargs=batch, strict=False)
        return head(model.mean_pool(out.last_hidden_state, batch["attention_mask"]))

    return forward


def learn(
    contributors: Sequence[Contributor], seed: int, top: Mapping[str, Any]
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """λ per contributor and encoder tensor (``top``: steps, lr, init), and a record of the run
    (data used, seconds)."""
    from safetensors.torch import load_file

    from potluck.ops.merge.adamerging import learn_layerwise

    t0 = time.perf_counter()
    tokenizer = model.load_tokenizer()
    encoder = model.load_encoder()
    for p in encoder.parameters():
        p.requires_grad_(False)
    base = load_file(str(model.base_weights()))
    names = [n for n, v in base.items() if v.is_floating_point() and n not in model.BUFFERS]
    theta0 = {n: base[n].float() for n in names}
    taus, forwards, batches = [], [], []
    for c in contributors:
        ft = load_file(str(c.encoder))
        taus.append({n: ft[n].float() - theta0[n] for n in names})
        head = finetune.load_head(c.head).eval()
        for p in head.parameters():
            p.requires_grad_(False)
        forwards.append(_pooled_forward(encoder, head))
        texts = data.load_task(c.task, seed=seed).train.texts[:MAX_SAMPLES]
        batches.append(unlabelled_batches(texts, tokenizer, BATCH_SIZE, seed))
    lam = learn_layerwise(
        theta0, taus, forwards, batches,
        steps=int(top["steps"]), lr=float(top["lr"]), init=float(top["init"]),
    )  # fmt: skip
    learn_s = round(time.perf_counter() - t0, 1)
    log(f"  adamerging {dict(top)}: λ learned in {learn_s} s, mean {lam.mean():.3f}, "
        f"range {lam.min():.3f}–{lam.max():.3f}")  # fmt: skip
    record = {
        "data": "train",
        "max_samples": MAX_SAMPLES,
        "batch_size": BATCH_SIZE,
        "learn_s": learn_s,
        "lambda_mean_per_task": lam.mean(axis=1).round(4).tolist(),
    }
    return [{n: float(lam[t, i]) for i, n in enumerate(names)} for t in range(len(taus))], record


def with_learned_weights(
    cfg: dict[str, Any], contributors: Sequence[Contributor], seed: int
) -> dict[str, Any]:
    """``cfg`` (an ``adamerging`` merge config) with each model's learned λ as its ``weight``:
    one ``{filter, value}`` condition per encoder tensor; the run's record under
    ``cfg["adamerging"]`` (removed before the merge)."""
    from potluck.ops.merge.adamerging import weight_conditions

    top = cfg["parameters"]
    coefficients, record = learn(contributors, seed, top)
    rest = {"value": float(top["init"])}  # tensors outside the learned ones (position_ids)
    for entry, c in zip(cfg["models"], coefficients, strict=True):
        entry["parameters"] = {**entry["parameters"], "weight": [*weight_conditions(c), rest]}
    return {**cfg, "adamerging": record}
