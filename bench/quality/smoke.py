"""A smoke-sized version of the pipeline (seconds): linear probe vs a short full fine-tune.

Used by ``tests/test_quality_data.py``; the same recipe as the benchmark (mean pooling, linear
head, AdamW on every encoder parameter) on a tiny subset and few steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bench.common import data, finetune, model

from .stages import train_probe


@dataclass(frozen=True)
class SmokeResult:
    """Test accuracies of the probe and of the fine-tune, and the split sizes."""

    probe: float
    finetuned: float
    train: int
    test: int


def _acc(encoder: Any, head: Any, tok: Any, split: data.Split, max_length: int) -> float:
    import torch

    emb = model.embed(encoder, tok, split.texts, max_length=max_length)
    with torch.inference_mode():
        pred = head(torch.from_numpy(emb)).argmax(-1).numpy()
    return float(np.mean(pred == np.array(split.labels)))


def smoke(
    task_name: str,
    *,
    caps: tuple[int, int, int] = (16, 4, 16),
    steps: int = 20,
    batch_size: int = 8,
    lr: float = 1e-4,
    max_length: int = 32,
    seed: int = 0,
    head_lr: float = 1e-2,
    from_probe: bool = False,
) -> SmokeResult:
    """Probe (frozen base) and fine-tune (encoder + head) on a tiny subset; test accuracies.

    ``from_probe`` starts the fine-tune's head from the probe (LP-FT, Kumar et al. 2022).
    """
    import torch

    torch.manual_seed(seed)
    task = data.load_task(task_name, seed=seed, caps=caps)
    tok, encoder = model.load_tokenizer(), model.load_encoder()
    x = model.embed(encoder, tok, task.train.texts, max_length=max_length)
    probe_head = train_probe(x, np.array(task.train.labels), len(task.label_names), seed, 1e-3)
    probe = _acc(encoder, probe_head, tok, task.test, max_length)
    head = torch.nn.Linear(x.shape[1], len(task.label_names))
    if from_probe:  # LP-FT: start from the probe's head
        head.load_state_dict(probe_head.state_dict())
    rng = np.random.default_rng(seed)
    order = [(0, rng.choice(len(task.train), size=batch_size, replace=False)) for _ in range(steps)]
    encoder.train()
    finetune.train_loop(
        encoder, [head], list(encoder.parameters()), [task], order, tok,
        lr=lr, head_lr=head_lr, max_length=max_length, weight_decay=0.01,  # AdamW's default
    )  # fmt: skip
    encoder.train(False)
    tuned = _acc(encoder, head, tok, task.test, max_length)
    return SmokeResult(probe, tuned, len(task.train), len(task.test))
