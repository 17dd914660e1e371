"""Full CPU fine-tune of all-MiniLM-L6-v2 (mean pooling + a linear head) on one task.

Every encoder parameter is trained (AdamW, linear warm-up then linear decay, dropout on as in
the shipped config), the head is a ``Linear(384, n_classes)`` on the mean-pooled embedding.
Seeds are fixed (torch, data order) and ``torch.set_num_threads`` is set, so a rerun on the same
machine and versions gives the same weights up to nondeterminism in CPU kernels.

Outputs in the run folder: ``encoder.safetensors`` (the same tensor names, dtypes and shapes as
the shipped ``model.safetensors``, so ``potluck patch create BASE encoder.safetensors`` works),
``head.safetensors`` (``weight``, ``bias``) and ``meta.json`` (config, accuracies, wall times,
versions). ``cached_finetune`` reuses a run whose config matches.

Run: ``.venv/bin/python -m bench.minilm.finetune --task fortune_topic --steps 300``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, model

RESULTS = Path(__file__).resolve().parent.parent / "results" / "minilm"


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that decides the fine-tuned weights (the cache key)."""

    task: str = "fortune_topic"
    seed: int = 0
    steps: int = 200
    batch_size: int = 8
    lr: float = 5e-5
    head_lr: float = 1e-3
    weight_decay: float = 0.0  # the Hugging Face Trainer default
    warmup: float = 0.1
    max_length: int = 64
    threads: int = 2

    def key(self) -> str:
        """A short hash of the config and the model/library versions."""
        import torch
        import transformers

        blob = json.dumps(
            [
                dataclasses.asdict(self),
                model.model_version(),
                torch.__version__,
                transformers.__version__,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Finetuned:
    """A finished run: its folder, files and ``meta.json`` contents."""

    folder: Path
    encoder: Path
    head: Path
    meta: dict[str, Any]


def _schedule(step: int, cfg: FinetuneConfig) -> float:
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def _batches(lengths: list[int], cfg: FinetuneConfig) -> list[np.ndarray]:
    """Index batches for ``cfg.steps`` steps, grouped by length to cut padding.

    Seeded reshuffle each epoch; the order is cut into chunks of 32 batches, each chunk sorted
    by token length and split into batches, and the batches are shuffled again (the idea of
    the Hugging Face Trainer's ``group_by_length``).
    """
    rng = np.random.default_rng(cfg.seed)
    n, need = len(lengths), cfg.steps * cfg.batch_size
    order: list[int] = []
    while len(order) < need:
        order.extend(rng.permutation(n).tolist())
    flat = np.array(order[:need])
    chunk = 32 * cfg.batch_size
    batches: list[np.ndarray] = []
    for i in range(0, need, chunk):
        part = flat[i : i + chunk]
        part = part[np.argsort([lengths[j] for j in part], kind="stable")]
        batches.extend(part.reshape(-1, cfg.batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def accuracy(
    encoder: Any, head: Any, tokenizer: Any, split: data.Split, max_length: int
) -> tuple[float, np.ndarray]:
    """(accuracy of ``head`` on ``split``, the mean-pooled embeddings used)."""
    import torch

    emb = model.embed(encoder, tokenizer, split.texts, max_length=max_length)
    with torch.inference_mode():
        pred = head(torch.from_numpy(emb)).argmax(-1).numpy()
    return float(np.mean(pred == np.array(split.labels))), emb


def _train(cfg: FinetuneConfig, task: data.Task, tokenizer: Any) -> tuple[Any, Any, list[float]]:
    import torch

    encoder = model.load_encoder()
    config: Any = encoder.config
    head = torch.nn.Linear(int(config.hidden_size), len(task.label_names))
    optimizer = torch.optim.AdamW(
        [
            {"params": list(encoder.parameters()), "lr": cfg.lr},
            {"params": list(head.parameters()), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, cfg))
    labels = torch.tensor(task.train.labels)
    losses = []
    t0 = time.perf_counter()
    encoder.train()
    lengths = [len(ids) for ids in tokenizer(task.train.texts)["input_ids"]]
    for step, idx in enumerate(_batches(lengths, cfg)):
        batch = tokenizer(
            [task.train.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=cfg.max_length,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state
        logits = head(model.mean_pool(hidden, batch["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, labels[torch.from_numpy(idx)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == cfg.steps - 1:
            print(
                f"  step {step:4d}  loss {np.mean(losses[-50:]):.4f}  "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
            )
    encoder.train(False)
    return encoder, head, losses


def finetune(cfg: FinetuneConfig, folder: Path) -> Finetuned:
    """Fine-tune per ``cfg`` and write encoder, head and meta.json into ``folder``."""
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    task = data.load_task(cfg.task, seed=cfg.seed)
    tokenizer = model.load_tokenizer()
    t0 = time.perf_counter()
    encoder, head, losses = _train(cfg, task, tokenizer)
    train_s = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    enc_path, head_path = folder / "encoder.safetensors", folder / "head.safetensors"
    model.save_encoder(encoder.state_dict(), enc_path)
    save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(head_path))
    val_acc, _ = accuracy(encoder, head, tokenizer, task.val, cfg.max_length)
    test_acc, _ = accuracy(encoder, head, tokenizer, task.test, cfg.max_length)
    meta = {
        "config": dataclasses.asdict(cfg),
        "key": cfg.key(),
        "task": task.summary(),
        "label_names": task.label_names,
        "sources": [dataclasses.asdict(s) for s in task.sources],
        "train_s": round(train_s, 2),
        "final_loss": float(np.mean(losses[-20:])),
        "val_acc": val_acc,
        "test_acc": test_acc,
        "versions": {
            "model": f"{model.MODEL_DIST} {model.model_version()}",
            "torch": torch.__version__,
            "transformers": data.pypi_version("transformers"),
        },
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return Finetuned(folder, enc_path, head_path, meta)


def cached_finetune(cfg: FinetuneConfig, root: Path = RESULTS) -> tuple[Finetuned, bool]:
    """(the run for ``cfg``, whether it came from the cache); fine-tunes when missing."""
    folder = root / f"{cfg.task}-{cfg.key()}"
    meta_path = folder / "meta.json"
    enc, head = folder / "encoder.safetensors", folder / "head.safetensors"
    if meta_path.is_file() and enc.is_file() and head.is_file():
        return Finetuned(folder, enc, head, json.loads(meta_path.read_text())), True
    return finetune(cfg, folder), False


def load_head(path: Path) -> Any:
    """The saved linear head as a ``torch.nn.Linear``."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    out, inp = state["weight"].shape
    head = torch.nn.Linear(inp, out)
    head.load_state_dict(state)
    return head


def main(argv: list[str] | None = None) -> int:
    """CLI: fine-tune (or reuse the cached run) and print where it is and how it did."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = FinetuneConfig()
    p.add_argument("--task", default=defaults.task, choices=sorted(data.TASKS))
    for f in dataclasses.fields(FinetuneConfig):
        if f.name != "task":
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    p.add_argument("--force", action="store_true", help="retrain even when cached")
    args = p.parse_args(argv)
    model.cpu_threads(args.threads)
    cfg = FinetuneConfig(
        **{f.name: getattr(args, f.name) for f in dataclasses.fields(FinetuneConfig)}
    )
    if args.force:
        run, cached = finetune(cfg, RESULTS / f"{cfg.task}-{cfg.key()}"), False
    else:
        run, cached = cached_finetune(cfg)
    m = run.meta
    print(f"{m['task']}")
    print(
        f"{'cached' if cached else 'trained'}: {run.folder}  train {m['train_s']} s  "
        f"val acc {m['val_acc']:.3f}  test acc {m['test_acc']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
