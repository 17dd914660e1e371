"""Full CPU fine-tune of all-MiniLM-L6-v2 (mean pooling + a linear head) on one task.

Every encoder parameter is trained (AdamW, linear warm-up then linear decay, dropout on as in
the shipped config), the head is a ``Linear(384, n_classes)`` on the mean-pooled embedding.
With ``lora_rank > 0`` (``lora_recipe``: the recipe of the LoRA contributors of
bench/modular/contrib.py) the encoder is frozen and only a rank-r LoRA on the attention
query/key/value/output linears plus the head is trained; the written encoder has
``W + (α/r)·B·A`` folded in, so it is a plain dense encoder file like a full fine-tune's.
Seeds are fixed (torch, data order) and ``torch.set_num_threads`` is set, so a rerun on the same
machine and versions gives the same weights up to nondeterminism in CPU kernels.

``train_loop`` is the one training loop of every fine-tune in bench/ (full and LoRA here, the
multi-task encoder and the smoke run of bench.quality, the contributors of bench.modular); the
callers differ only in what they build, which parameters train, the batch order and the
schedule.

Outputs in the run folder: ``encoder.safetensors`` (the same tensor names, dtypes and shapes as
the shipped ``model.safetensors``, so ``potluck patch create BASE encoder.safetensors`` works),
``head.safetensors`` (``weight``, ``bias``) and ``meta.json`` (config, accuracies, wall times,
versions). ``cached_finetune`` reuses a run whose config matches.

Run: ``.venv/bin/python -m bench.common.finetune --task fortune_topic --steps 300``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import data, model, paths

RESULTS = paths.RESULTS / "minilm"


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
    #: LoRA rank; 0 = full fine-tune. The fields below it were added later and enter the cache
    #: key only when they differ from their defaults, so full fine-tune keys are unchanged.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    constant_lr: bool = False
    #: "" (random head, the first recipe) or "probe": the head starts as the linear probe on
    #: the frozen base encoder (LP-FT, Kumar et al., ICLR 2022; ``probe_head``)
    head_init: str = ""

    def key_fields(self) -> dict[str, Any]:
        """The fields hashed by ``key``: later-added fields only when not at their default."""
        out = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if out[name] == default:
                del out[name]
        return out

    def key(self) -> str:
        """A short hash of the config and the model/library versions."""
        import torch
        import transformers

        blob = json.dumps(
            [
                self.key_fields(),
                model.model_version(),
                torch.__version__,
                transformers.__version__,
            ],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


#: Fields added after the first cached runs, with the defaults that leave a key unchanged.
LATER_FIELDS: dict[str, Any] = {
    "lora_rank": 0,
    "lora_alpha": 16.0,
    "constant_lr": False,
    "head_init": "",
}
#: The L2 strengths a probe head is chosen from (on validation accuracy).
PROBE_L2 = (1e-4, 1e-3, 1e-2)
#: The linears a LoRA adapts in each layer (here and in bench/modular/contrib.py).
LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
)


def lora_recipe(task: str, seed: int) -> FinetuneConfig:
    """The LoRA contributor recipe of ``bench/modular/contrib.py``: rank 8, α 16, q/k/v/o,
    AdamW lr 2e-3 (head 1e-2), constant learning rate, batch 16, 150 steps."""
    return FinetuneConfig(task=task, seed=seed, steps=150, batch_size=16, lr=2e-3, head_lr=1e-2,
                          lora_rank=8, lora_alpha=16.0, constant_lr=True)  # fmt: skip


def fold_lora(weight: Any, a: Any, b: Any, scale: float) -> Any:
    """The dense weight ``W + scale·B·A`` (W [out, in], A [r, in], B [out, r])."""
    return weight + scale * (b @ a)


def lora_linear_class() -> type[Any]:
    """The LoRA wrapper of a frozen ``nn.Linear``."""
    import torch
    from torch import nn

    class LoraLinear(nn.Module):
        """``base(x) + scale·B(A x)``, base frozen; A Kaiming-uniform, B zero (so Δ = 0)."""

        def __init__(self, base: Any, rank: int, scale: float) -> None:
            super().__init__()
            self.base, self.scale = base, scale
            self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
            nn.init.kaiming_uniform_(self.lora_a, a=5**0.5)
            self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))

        def forward(self, x: Any) -> Any:
            return self.base(x) + self.scale * ((x @ self.lora_a.T) @ self.lora_b.T)

    return LoraLinear


def add_lora(encoder: Any, rank: int, alpha: float) -> dict[str, Any]:
    """Freeze ``encoder``; wrap every ``LORA_TARGETS`` linear; {module name: LoraLinear}."""
    for p in encoder.parameters():
        p.requires_grad_(False)
    cls, out = lora_linear_class(), {}
    modules = dict(encoder.named_modules())
    for i in range(int(encoder.config.num_hidden_layers)):
        for t in LORA_TARGETS:
            full = f"encoder.layer.{i}.{t}"
            parent, _, attr = full.rpartition(".")
            out[full] = cls(modules[full], rank, alpha / rank)
            setattr(modules[parent], attr, out[full])
    return out


def merge_lora(encoder: Any, loras: dict[str, Any]) -> None:
    """Fold every LoRA into its base linear (``fold_lora``) and put the plain linear back."""
    import torch

    modules = dict(encoder.named_modules())
    with torch.no_grad():
        for full, lin in loras.items():
            w = fold_lora(lin.base.weight, lin.lora_a, lin.lora_b, lin.scale)
            lin.base.weight.copy_(w)
            parent, _, attr = full.rpartition(".")
            setattr(modules[parent], attr, lin.base)


@dataclass(frozen=True)
class Finetuned:
    """A finished run: its folder, files and ``meta.json`` contents."""

    folder: Path
    encoder: Path
    head: Path
    meta: dict[str, Any]


def _schedule(step: int, cfg: FinetuneConfig) -> float:
    if cfg.constant_lr:
        return 1.0
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return (step + 1) / warm
    return max(0.0, (cfg.steps - step) / max(1, cfg.steps - warm))


def _epochs(rng: np.random.Generator, n: int, need: int) -> np.ndarray:
    """The first ``need`` indices of seeded reshuffled epochs over ``range(n)``."""
    order: list[int] = []
    while len(order) < need:
        order.extend(rng.permutation(n).tolist())
    return np.array(order[:need])


def shuffled_batches(n: int, steps: int, batch: int, seed: int) -> list[np.ndarray]:
    """Seeded epochs of shuffled indices cut into ``steps`` batches."""
    flat = _epochs(np.random.default_rng(seed), n, steps * batch)
    return [flat[i * batch : (i + 1) * batch] for i in range(steps)]


def _batches(lengths: list[int], cfg: FinetuneConfig) -> list[np.ndarray]:
    """Index batches for ``cfg.steps`` steps, grouped by length to cut padding.

    Seeded reshuffle each epoch; the order is cut into chunks of 32 batches, each chunk sorted
    by token length and split into batches, and the batches are shuffled again (the idea of
    the Hugging Face Trainer's ``group_by_length``).
    """
    rng = np.random.default_rng(cfg.seed)
    need = cfg.steps * cfg.batch_size
    flat = _epochs(rng, len(lengths), need)
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


def train_loop(
    encoder: Any,
    heads: Sequence[Any],
    trained: Sequence[Any],
    tasks: Sequence[data.Task],
    order: Sequence[tuple[int, np.ndarray]],
    tokenizer: Any,
    *,
    lr: float,
    head_lr: float,
    max_length: int,
    weight_decay: float = 0.0,
    schedule: Callable[[int], float] | None = None,
    log_every: int = 25,
    label: str = "",
) -> list[float]:
    """Train ``trained`` (lr) and every head (head_lr) with AdamW; the losses, one per step.

    Step ``s`` takes ``order[s] = (t, idx)``: training texts ``idx`` of ``tasks[t]`` (padded,
    truncated to ``max_length`` tokens) through ``encoder``, mean pooling and ``heads[t]``,
    cross-entropy with their labels, one optimizer step, then ``schedule`` (the learning-rate
    factor of each step; None: constant). The encoder's mode (dropout) is the caller's. Every
    ``log_every`` steps the mean loss since the last report goes to stderr.
    """
    import torch

    optimizer = torch.optim.AdamW(
        [
            {"params": list(trained), "lr": lr},
            {"params": [p for h in heads for p in h.parameters()], "lr": head_lr},
        ],
        weight_decay=weight_decay,
    )
    scheduler = None if schedule is None else torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    labels = [torch.tensor(t.train.labels) for t in tasks]
    losses: list[float] = []
    t0 = time.perf_counter()
    for step, (ti, idx) in enumerate(order):
        batch = tokenizer(
            [tasks[ti].train.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = encoder(**batch).last_hidden_state
        logits = heads[ti](model.mean_pool(hidden, batch["attention_mask"]))
        loss = torch.nn.functional.cross_entropy(logits, labels[ti][torch.from_numpy(idx)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == len(order) - 1:
            print(
                f"  {label}step {step:4d}  loss {np.mean(losses[-log_every:]):.4f}  "
                f"{time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    return losses


def train_probe(x: np.ndarray, y: np.ndarray, n_classes: int, seed: int, l2: float) -> Any:
    """A linear head on frozen embeddings: full-batch L-BFGS, cross-entropy + l2·‖W‖²."""
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], n_classes)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> Any:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xs), ys) + l2 * head.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return head


def probe_head(encoder: Any, task: data.Task, tokenizer: Any, cfg: FinetuneConfig) -> Any:
    """The linear probe on ``encoder`` (frozen): L2 strength from ``PROBE_L2`` picked on
    validation accuracy (bench.quality's probe protocol)."""
    import torch

    encoder.train(False)
    x = model.embed(encoder, tokenizer, task.train.texts, max_length=cfg.max_length)
    xv = model.embed(encoder, tokenizer, task.val.texts, max_length=cfg.max_length)
    best, best_acc = None, -1.0
    for l2 in PROBE_L2:
        head = train_probe(x, np.array(task.train.labels), len(task.label_names), cfg.seed, l2)
        with torch.inference_mode():
            acc = float(np.mean(head(torch.from_numpy(xv)).argmax(-1).numpy() == task.val.labels))
        if acc > best_acc:
            best, best_acc = head, acc
    return best


def _train(cfg: FinetuneConfig, task: data.Task, tokenizer: Any) -> tuple[Any, Any, list[float]]:
    import torch

    encoder = model.load_encoder()
    config: Any = encoder.config
    head = torch.nn.Linear(int(config.hidden_size), len(task.label_names))
    if cfg.head_init == "probe":
        head = probe_head(encoder, task, tokenizer, cfg)
    elif cfg.head_init:
        raise ValueError(f"head_init {cfg.head_init!r}: expected '' or 'probe'")
    loras = add_lora(encoder, cfg.lora_rank, cfg.lora_alpha) if cfg.lora_rank else {}
    trained = [p for m in loras.values() for p in (m.lora_a, m.lora_b)] if loras \
        else list(encoder.parameters())  # fmt: skip
    lengths = [len(ids) for ids in tokenizer(task.train.texts)["input_ids"]]
    encoder.train()
    losses = train_loop(
        encoder, [head], trained, [task], [(0, idx) for idx in _batches(lengths, cfg)], tokenizer,
        lr=cfg.lr, head_lr=cfg.head_lr, max_length=cfg.max_length,
        weight_decay=cfg.weight_decay, schedule=lambda s: _schedule(s, cfg),
    )  # fmt: skip
    encoder.train(False)
    merge_lora(encoder, loras)
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
        if f.type in (bool, "bool"):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        elif f.name != "task":
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
