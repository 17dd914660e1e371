"""The contributor side: fine-tunes (cached), linear probes, Fisher/Gram statistics, evaluation.

torch is imported inside functions; call ``bench.common.model.cpu_threads`` before.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data, finetune, model, paths

RESULTS = paths.RESULTS / "quality"
#: Where bench.common caches the same configurations (reused read-only: same cache key).
MINILM_CACHE = finetune.RESULTS
MAX_LENGTH = 64


def log(msg: str) -> None:
    """Progress on stderr."""
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Stopwatch:
    """Wall time per stage, printed as it ends."""

    times: dict[str, float]

    def stage(self, name: str, t0: float) -> None:
        """Record and print the time since ``t0`` for stage ``name``."""
        self.times[name] = round(time.perf_counter() - t0, 1)
        log(f"[time] {name}: {self.times[name]} s")


#: Fine-tuning recipes: "base" (the first: random head, bench.common defaults) and "lpft"
#: (the second, chosen on validation: the head starts as the linear probe, then the same full
#: fine-tune; LP-FT, Kumar et al., ICLR 2022).
RECIPES = {"base": "", "lpft": "probe"}


def finetune_config(
    task: str, seed: int, steps: int, recipe: str = "base"
) -> finetune.FinetuneConfig:
    """The benchmark's fine-tune settings (bench.common defaults, 2 threads) for ``recipe``."""
    return finetune.FinetuneConfig(
        task=task, seed=seed, steps=steps, threads=2, head_init=RECIPES[recipe]
    )


def cached_finetune(cfg: finetune.FinetuneConfig, root: Path) -> finetune.Finetuned:
    """The run for ``cfg``: from ``root``, else hard-linked from bench.common's cache, else
    trained into ``root``."""
    folder = root / f"{cfg.task}-{cfg.key()}"
    other = MINILM_CACHE / folder.name
    names = ("meta.json", "encoder.safetensors", "head.safetensors")
    if not (folder / "meta.json").is_file() and all((other / n).is_file() for n in names):
        folder.mkdir(parents=True, exist_ok=True)
        for n in names:
            if not (folder / n).exists():
                os.link(other / n, folder / n)
        log(f"  {cfg.task}: reusing bench.common.finetune's cached run {other.name}")
    run, cached = finetune.cached_finetune(cfg, root)
    if not cached:
        log(f"  {cfg.task}: trained in {run.meta['train_s']} s")
    return run


class Evaluator:
    """Embeds a fixed set of texts with any encoder weights; scores each task with a head."""

    def __init__(self, tasks: Sequence[data.Task], split: str) -> None:
        self.tokenizer = model.load_tokenizer()
        self.encoder = model.load_encoder()
        self.spans: dict[str, tuple[int, int]] = {}
        self.texts: list[str] = []
        self.labels: dict[str, np.ndarray] = {}
        for t in tasks:
            s = getattr(t, split)
            self.spans[t.name] = (len(self.texts), len(self.texts) + len(s))
            self.texts.extend(s.texts)
            self.labels[t.name] = np.array(s.labels)

    def embed(self, weights: Path | None, only: Sequence[str] | None = None) -> np.ndarray:
        """Embeddings of all texts (or of tasks ``only``; other rows zero) under ``weights``."""
        model.load_weights(self.encoder, weights or model.base_weights())
        idx = self._rows(only)
        out = np.zeros((len(self.texts), 384), np.float32)
        texts = [self.texts[i] for i in idx]
        out[idx] = model.embed(self.encoder, self.tokenizer, texts, max_length=MAX_LENGTH)
        return out

    def _rows(self, only: Sequence[str] | None) -> list[int]:
        names = list(self.spans) if only is None else list(only)
        return [i for n in names for i in range(*self.spans[n])]

    def accuracy(self, emb: np.ndarray, task: str, head: Any) -> float:
        """Accuracy of ``head`` on task ``task``'s rows of ``emb``."""
        import torch

        a, b = self.spans[task]
        with torch.inference_mode():
            pred = head(torch.from_numpy(emb[a:b])).argmax(-1).numpy()
        return float(np.mean(pred == self.labels[task]))

    def scores(
        self, weights: Path | None, heads: Mapping[str, Any], only: Sequence[str] | None = None
    ) -> dict[str, float]:
        """{task: accuracy} of ``weights`` with each task's own head."""
        names = list(heads) if only is None else list(only)
        emb = self.embed(weights, names)
        return {n: self.accuracy(emb, n, heads[n]) for n in names}


train_probe = finetune.train_probe


def linear_probe(
    task: data.Task, train_emb: np.ndarray, val_emb: np.ndarray, test_emb: np.ndarray, seed: int
) -> dict[str, Any]:
    """Probe on the frozen base encoder; L2 strength picked on validation accuracy."""
    import torch

    y = np.array(task.train.labels)
    best: dict[str, Any] = {}
    for l2 in finetune.PROBE_L2:
        head = train_probe(train_emb, y, len(task.label_names), seed, l2)
        with torch.inference_mode():
            val = float(
                np.mean(head(torch.from_numpy(val_emb)).argmax(-1).numpy() == task.val.labels)
            )
            test = float(
                np.mean(head(torch.from_numpy(test_emb)).argmax(-1).numpy() == task.test.labels)
            )
        if not best or val > best["val_acc"]:
            best = {"l2": l2, "val_acc": val, "test_acc": test}
    return best


def probes(tasks: Sequence[data.Task], seed: int, root: Path) -> dict[str, dict[str, Any]]:
    """Linear-probe results per task (cached in ``root/probes-s{seed}.json``)."""
    path = root / f"probes-s{seed}.json"
    if path.is_file():
        cached: dict[str, dict[str, Any]] = json.loads(path.read_text())
        if set(cached) >= {t.name for t in tasks}:
            return cached
    out = {}
    tok, enc = model.load_tokenizer(), model.load_encoder()
    for t in tasks:
        emb = [
            model.embed(enc, tok, s.texts, max_length=MAX_LENGTH) for s in (t.train, t.val, t.test)
        ]
        out[t.name] = linear_probe(t, emb[0], emb[1], emb[2], seed)
        log(f"  probe {t.name}: {out[t.name]}")
    path.write_text(json.dumps(out, indent=2) + "\n")
    return out


def _batches(task: data.Task, tokenizer: Any, n: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """The first ``n`` training examples, tokenised in batches (with ``labels``)."""
    import torch

    texts, labels = task.train.texts[:n], task.train.labels[:n]
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        yield {**enc, "labels": torch.tensor(labels[i : i + batch_size])}


def _hashes(weights: Path, names: Sequence[str]) -> dict[str, str]:
    from safetensors.numpy import load_file

    from potluck.tensors.digests import tensor_sha256

    tensors = load_file(str(weights))
    return {n: tensor_sha256(tensors[n]) for n in names if n in tensors}


def contributor_stats(
    run: finetune.Finetuned, task: data.Task, out_dir: Path, fisher_n: int, gram_n: int
) -> dict[str, Path]:
    """Fisher and Gram statistics of a contributor's fine-tune on its own training data.

    Gram (``gram``; ``gram_emb`` adds the embeddings' lookup counts): ``potluck stats gram``'s
    own path (``grams.gram_stats``) on the first ``gram_n`` training texts, no labels. Fisher:
    ``fisher_diag`` with the bench's loss — the cross-entropy of the contributor's own head on
    the mean-pooled embedding, on the first ``fisher_n`` training examples **with their labels**
    (``potluck stats fisher`` needs a Hugging Face sequence classifier, whose head is not this
    one)."""
    from . import grams

    paths = {k: out_dir / f"{task.name}.{k}.stats" for k in ("fisher", "gram", "gram_emb")}
    out_dir.mkdir(parents=True, exist_ok=True)
    for kind in ("gram", "gram_emb"):
        if not paths[kind].is_file():
            t0 = time.perf_counter()
            texts = task.train.texts[:gram_n]
            grams.gram_stats(run.encoder, texts, paths[kind], embeddings=kind == "gram_emb",
                             max_length=MAX_LENGTH)  # fmt: skip
            log(f"  {kind} stats {task.name}: {len(texts)} texts, {time.perf_counter() - t0:.0f} s")
    if not paths["fisher"].is_file():
        _fisher_stats(run, task, paths["fisher"], fisher_n)
    return paths


def _fisher_stats(run: finetune.Finetuned, task: data.Task, path: Path, n: int) -> None:
    """``path``: the empirical diagonal Fisher of the contributor's encoder under its own head
    on the first ``n`` labelled training examples (one backward pass per example)."""
    import torch

    from potluck.ops.merge.stats_torch import fisher_diag
    from potluck.ops.merge.statsfile import write_stats

    t0 = time.perf_counter()
    tok, enc = model.load_tokenizer(), model.load_encoder(run.encoder)
    head = finetune.load_head(run.head)

    def nll(m: Any, batch: Mapping[str, Any]) -> Any:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        pooled = model.mean_pool(m(**inputs).last_hidden_state, batch["attention_mask"])
        return torch.nn.functional.cross_entropy(head(pooled), batch["labels"], reduction="sum")

    batches = list(_batches(task, tok, n, 1))
    tensors = fisher_diag(enc, batches, nll)
    write_stats(
        path, "fisher", tensors, samples=min(n, len(task.train)),
        tokens=int(sum(int(b["attention_mask"].sum()) for b in batches)),
        model_sha256=_hashes(run.encoder, list(tensors)),
        description={"tool": "bench.quality", "task": task.name, "split": "train",
                     "loss": "own head on mean-pooled embedding, training labels"},
    )  # fmt: skip
    log(f"  fisher stats {task.name}: {n} examples, {time.perf_counter() - t0:.0f} s")
