"""One contributor's work: a LoRA expert + task head on its own task, then its PHATGOOSE gates.

The LoRA is trained with plain torch (no peft; ``add_lora`` and ``train_loop`` of
``bench.common.finetune``): every attention linear of all-MiniLM-L6-v2 (``query``, ``key``,
``value`` and the output projection ``attention.output.dense``) gets ``W x + (α/r)·B A x`` with
rank ``r = 8``, ``α = 16``, A ~ N(0, 1/r)-ish (Kaiming), B = 0. The encoder is frozen; A, B and
a fresh ``Linear(384, n_classes)`` head on the mean-pooled last hidden state are trained with
AdamW. Dropout is off (the model stays in eval mode), so a rerun gives the same weights up to
CPU-kernel nondeterminism.

The expert is written as a potluck patch (``lowrank`` payloads, factors ``lora_A [r, in]``,
``lora_B [out, r]`` with the scale α/r folded into B), pinned to the shipped base file, and
added to the library with its Arrow prototypes; the contributor then trains PHATGOOSE gates with
``potluck.ops.compose.runtime.train_gates`` on its own training data (expert and head frozen) and
attaches them as the expert's ``phatgoose`` artifact. The head is kept per task next to the
library (``heads/<task>.safetensors``): it is not a tensor of the base, so it cannot be part of a
potluck patch of the encoder.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from bench.common import data, finetune, model
from potluck.codecs import factors_payload
from potluck.formats.safetensors import write_safetensors
from potluck.ops.compose.library import AddOptions, ExpertRecord, add_expert, attach_artifact
from potluck.ops.models.sources import open_path
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy


@dataclass(frozen=True)
class ContribConfig:
    """How every contributor trains (the same recipe for each task)."""

    rank: int = 8
    alpha: float = 16.0
    steps: int = 150
    batch_size: int = 16
    lr: float = 2e-3
    head_lr: float = 1e-2
    max_length: int = 64
    gate_steps: int = 60
    gate_lr: float = 1e-2
    gate_batch: int = 16


def train_expert(
    task: data.Task, tokenizer: Any, cfg: ContribConfig, seed: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], Any, float]:
    """LoRA + head on ``task``: ({module: (A [r,in], B·scale [out,r])}, head, seconds)."""
    import torch

    torch.manual_seed(seed)
    encoder: Any = model.load_encoder()  # eval mode: dropout off
    loras = finetune.add_lora(encoder, cfg.rank, cfg.alpha)
    head = torch.nn.Linear(int(encoder.config.hidden_size), len(task.label_names))
    lora_params = [p for m in loras.values() for p in (m.lora_a, m.lora_b)]
    batches = finetune.shuffled_batches(len(task.train), cfg.steps, cfg.batch_size, seed)
    t0 = time.perf_counter()
    finetune.train_loop(
        encoder, [head], lora_params, [task], [(0, idx) for idx in batches], tokenizer,
        lr=cfg.lr, head_lr=cfg.head_lr, max_length=cfg.max_length, log_every=50,
        label=f"{task.name} ",
    )  # fmt: skip
    factors = {
        m: (
            lin.lora_a.detach().double().numpy(),
            (lin.lora_b.detach().double() * lin.scale).numpy(),
        )
        for m, lin in loras.items()
    }
    return factors, head, time.perf_counter() - t0


def write_expert_patch(
    factors: dict[str, tuple[np.ndarray, np.ndarray]], out: Path, description: dict[str, Any]
) -> Path:
    """The LoRA as a potluck patch of the shipped base (pinned to its tensor hashes)."""
    payloads = {
        f"{m}.weight": factors_payload(
            b.astype(np.float32), a.astype(np.float32), shape=(b.shape[0], a.shape[1]), dtype="F32"
        )
        for m, (a, b) in factors.items()
    }
    with open_path(str(model.model_dir())) as src:
        pins = {name: tensor_sha256(src.read(name)) for name in payloads}
    write_patch(out, PatchContents(payloads, pins, {}, [], [], description))
    return out


def save_st(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A safetensors file of numpy arrays (potluck's writer)."""
    specs = [(n, from_numpy(a.dtype), tuple(a.shape)) for n, a in tensors.items()]
    write_safetensors(path, specs, list(tensors.values()))
    return path


def _gate_model(head: Any) -> Any:
    """Base encoder + mean pool + the contributor's head, returning ``.loss`` (for gates)."""
    import torch
    from torch import nn

    class Classifier(nn.Module):
        base_model_prefix = "bert"

        def __init__(self) -> None:
            super().__init__()
            self.bert, self.head = model.load_encoder(), head

        def forward(self, input_ids: Any, attention_mask: Any, labels: Any, **kw: Any) -> Any:
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, **kw
            ).last_hidden_state
            logits = self.head(model.mean_pool(hidden, attention_mask))
            loss = torch.nn.functional.cross_entropy(logits, labels)
            return SimpleNamespace(loss=loss, logits=logits)

    return Classifier()


def train_gate(
    record: ExpertRecord,
    head: Any,
    task: data.Task,
    tokenizer: Any,
    cfg: ContribConfig,
    seed: int,
) -> tuple[dict[str, np.ndarray], float]:
    """PHATGOOSE gates of ``record`` on the contributor's own training data (expert frozen)."""
    import torch

    from potluck.ops.compose.runtime import train_gates

    batches = []
    labels = torch.tensor(task.train.labels)
    for idx in finetune.shuffled_batches(len(task.train), cfg.gate_steps, cfg.gate_batch, seed + 7):
        enc = dict(
            tokenizer(
                [task.train.texts[i] for i in idx],
                padding=True,
                truncation=True,
                max_length=cfg.max_length,
                return_tensors="pt",
            )
        )
        enc["labels"] = labels[torch.from_numpy(idx)]
        batches.append(enc)
    t0 = time.perf_counter()
    gates = train_gates(_gate_model(head), record, batches, steps=cfg.gate_steps, lr=cfg.gate_lr)
    return gates, time.perf_counter() - t0


def contribute(
    lib: Path, work: Path, task: data.Task, tokenizer: Any, cfg: ContribConfig, seed: int
) -> dict[str, Any]:
    """The whole contribution of one task: expert + Arrow, head file, gates. Returns timings."""
    from safetensors.torch import save_file

    factors, head, train_s = train_expert(task, tokenizer, cfg, seed)
    patch = write_expert_patch(
        factors,
        work / f"{task.name}.patch",
        {"task": task.name, "rank": cfg.rank, "alpha": cfg.alpha, "steps": cfg.steps},
    )
    lic = "; ".join(f"{s.package}: {s.license}" for s in task.sources)
    t0 = time.perf_counter()
    rec = add_expert(
        lib,
        patch,
        task.name,
        "1.0",
        base=str(model.model_dir()),
        options=AddOptions(tags=[task.name], license=lic, arrow=True, description=task.description),
    )
    add_s = time.perf_counter() - t0
    (lib / "heads").mkdir(exist_ok=True)
    save_file(
        {k: v.detach().contiguous() for k, v in head.state_dict().items()},
        str(lib / "heads" / f"{task.name}.safetensors"),
    )
    gates, gate_s = train_gate(rec, head, task, tokenizer, cfg, seed)
    attach_artifact(rec, "phatgoose", {k: v.astype(np.float32) for k, v in gates.items()})
    return {"train_s": train_s, "library_add_s": add_s, "gate_s": gate_s}


def heads_of(lib: Path, tasks: Sequence[str]) -> list[Any]:
    """The contributors' heads, in ``tasks`` order."""
    return [finetune.load_head(lib / "heads" / f"{t}.safetensors") for t in tasks]
