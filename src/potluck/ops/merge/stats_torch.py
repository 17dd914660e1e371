"""Computing merge statistics with PyTorch: diagonal Fisher and Gram matrices of linear inputs.

The only module that imports torch / transformers, always inside functions (never at import
time). ``fisher_diag`` and ``gram_matrices`` work on any ``torch.nn.Module``; ``compute_stats``
is what ``potluck stats fisher|gram`` runs on a Hugging Face model directory (see
``docs/merging-stats.md`` for the data formats and the model and loss it picks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.errors import UserError
from potluck.fileio import file_sha256
from potluck.ops.merge.statsfile import write_stats
from potluck.ops.models.torchdata import (
    architectures,
    checkpoint_hashes,
    load_batches,
    load_pretrained,
    require_torch,
    to_device,
)

if TYPE_CHECKING:
    import torch

Batch = Mapping[str, "torch.Tensor"]
_EMPIRICAL = "empirical, per-example"
#: ``loss_fn(model, batch)`` → the batch's negative log-likelihood, summed over its examples.
LossFn = Callable[[Any, Batch], "torch.Tensor"]
#: ``forward(model, batch)`` runs the model on a batch (default: ``model(**batch)`` less labels).
ForwardFn = Callable[[Any, Batch], Any]


def _examples(batch: Batch) -> Iterator[dict[str, torch.Tensor]]:
    sizes = {int(v.shape[0]) for v in batch.values()}
    if len(sizes) != 1:
        raise UserError("batch tensors disagree on the batch size", hint="check the data")
    for i in range(sizes.pop()):
        yield {k: v[i : i + 1] for k, v in batch.items()}


def fisher_diag(
    model: torch.nn.Module, batches: Iterable[Batch], loss_fn: LossFn
) -> dict[str, np.ndarray]:
    """Empirical diagonal Fisher: the mean over examples of squared per-example gradients.

    Fᵢ = (1/N) Σₙ (∂ log p(yₙ | xₙ) / ∂θᵢ)² with the labels yₙ of the data (not sampled from the
    model). Gradients are per example (one backward pass per example, the batch sliced to size
    1), never of a batch mean, whose square would underestimate the Fisher. Every parameter
    with ``requires_grad`` gets an entry (zeros if unused); the model runs in eval mode (no
    dropout) and is left in the mode it had. Accumulates in float64 on CPU, float32 elsewhere.
    """
    import torch

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=_acc_dtype(p)) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            for example in _examples(batch):
                loss = loss_fn(model, example)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (name, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        acc[name] += g.detach().to(acc[name].dtype) ** 2
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError("no examples to compute the Fisher on", hint="check --data / --max-samples")
    return {n: (a / count).cpu().double().numpy() for n, a in acc.items()}


def _acc_dtype(p: torch.Tensor) -> torch.dtype:
    import torch

    return torch.float64 if p.device.type == "cpu" else torch.float32


def linear_modules(model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, int]]:
    """{weight parameter name: (module, input axis)} for ``nn.Linear`` (axis 1) and
    Hugging Face's GPT-2 ``Conv1D`` (weight [in, out]: axis 0)."""
    import torch

    out: dict[str, tuple[torch.nn.Module, int]] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, torch.nn.Linear):
            out[prefix + "weight"] = (module, 1)
        elif type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
            out[prefix + "weight"] = (module, 0)
    return out


def embedding_modules(model: torch.nn.Module) -> dict[str, torch.nn.Embedding]:
    """{weight parameter name: module} for every ``nn.Embedding`` (weight [num, d]: axis 0)."""
    import torch

    out: dict[str, torch.nn.Embedding] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            out[f"{name}.weight" if name else "weight"] = module
    return out


def input_axes(model: torch.nn.Module, *, embeddings: bool = False) -> dict[str, int]:
    """{weight name: input axis} of every layer ``gram_matrices`` covers (embeddings: 0)."""
    axes = {n: axis for n, (_, axis) in linear_modules(model).items()}
    if embeddings:
        axes.update({n: 0 for n in embedding_modules(model)})
    return axes


def _default_forward(model: Any, batch: Batch) -> Any:
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The layer's input vectors, one per row, padding positions dropped.

    Inputs shaped [batch, seq, d] matching the ``attention_mask`` keep the unmasked positions;
    anything else (e.g. a pooled [batch, d] classifier input) keeps every row.
    """
    d = x.shape[-1]
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()]
    return x.reshape(-1, d)


def _ids(ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The looked-up indices at non-padding positions (position ids [1, T] are broadcast)."""
    import torch

    if mask is not None and ids.dim() == mask.dim():
        try:
            return torch.broadcast_to(ids, mask.shape)[mask.bool()]
        except RuntimeError:
            pass
    return ids.reshape(-1)


def _count_hook(
    name: str, size: int, acc: dict[str, torch.Tensor], state: dict[str, torch.Tensor | None]
) -> Callable[..., None]:
    import torch

    def hook(_module: Any, args: tuple[Any, ...], _output: Any) -> None:
        ids = _ids(args[0].detach(), state["mask"]).cpu()
        counts = torch.bincount(ids, minlength=size).to(torch.float64)
        acc[name] = counts if name not in acc else acc[name] + counts

    return hook


def gram_matrices(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    forward: ForwardFn | None = None,
    *,
    embeddings: bool = False,
) -> dict[str, np.ndarray]:
    """Gram matrix XᵀX of each linear layer's inputs over all non-padding tokens.

    Forward hooks on every ``nn.Linear`` (and GPT-2 ``Conv1D``) accumulate, in float64, the
    input vectors whose ``attention_mask`` (a key of the batch) is 1. Keys are the weights'
    parameter names; the matrices are [in, in] (see ``input_axes`` for the weight's layout).
    A layer that never ran gets no entry. Sums, not means: more data weighs more in RegMean.

    ``embeddings=True`` also covers every ``nn.Embedding``: a lookup is a linear layer on one-hot
    inputs, so its Gram matrix is diagonal — the number of times each row was looked up — and is
    stored as that 1-D diagonal ([num_embeddings]; input axis 0).
    """
    import torch

    run = forward or _default_forward
    layers = linear_modules(model)
    acc: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor | None] = {"mask": None}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], _output: Any) -> None:
            rows = _rows(args[0].detach(), state["mask"])
            if rows.device.type == "mps":  # no float64 there
                rows = rows.cpu()
            rows = rows.to(torch.float64)
            g = rows.T @ rows
            acc[name] = g if name not in acc else acc[name] + g

        return hook

    handles = [m.register_forward_hook(hook_for(n)) for n, (m, _) in layers.items()]
    if embeddings:
        handles += [
            m.register_forward_hook(_count_hook(n, m.num_embeddings, acc, state))
            for n, m in embedding_modules(model).items()
        ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"] = batch.get("attention_mask")
                run(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: g.cpu().numpy() for n, g in sorted(acc.items())}


# ── losses for Hugging Face models ──────────────────────────────────────────────────────────


def classification_nll(model: Any, batch: Batch) -> torch.Tensor:
    """Σ −log p(label | text) of a sequence classifier (``batch["labels"]``: [B] ints)."""
    import torch.nn.functional as F

    logits = _default_forward(model, batch).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")


def causal_lm_nll(model: Any, batch: Batch) -> torch.Tensor:
    """Σ −log p(token | previous tokens) over the non-padding next tokens of each sequence.

    The targets are ``input_ids`` shifted by one, or ``labels`` ([B, T], −100 ignored) if given.
    """
    import torch.nn.functional as F

    logits = _default_forward(model, batch).logits[:, :-1]
    targets = batch.get("labels", batch["input_ids"])[:, 1:].clone()
    if "attention_mask" in batch:
        targets[batch["attention_mask"][:, 1:] == 0] = -100
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


# ── Hugging Face models: ``potluck stats`` ───────────────────────────────────────────────────


_CLASSIFIER = "AutoModelForSequenceClassification"
_CAUSAL_LM = "AutoModelForCausalLM"
_LM_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _missing_text(missing: list[str]) -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"its checkpoint lacks {shown}, which would be randomly initialised"


def _fisher_model(model_dir: str | os.PathLike[str], labels: str | None) -> tuple[Any, str]:
    """Fisher needs the model's own likelihood: a classifier for class labels, else a causal
    LM — each loaded only when the checkpoint holds every weight of its head."""
    archs = ", ".join(architectures(model_dir)) or "none named"
    if labels == "class":
        model, missing = load_pretrained(_CLASSIFIER, model_dir)
        if model is None or missing:
            why = "its config has no classifier" if model is None else _missing_text(missing)
            raise UserError(
                f"{model_dir}: the data has class labels, but the model (architectures: "
                f"{archs}) is not a sequence classifier: {why}",
                hint="a Fisher on labelled data needs the classifier's own checkpoint; for a "
                "language model, leave out the labels (next-token likelihood)",
                architectures=archs,
            )
        return model, "classification"
    model, missing = load_pretrained(_CAUSAL_LM, model_dir)
    if model is None or missing:
        why = "its config has no causal-LM head" if model is None else _missing_text(missing)
        raise UserError(
            f"{model_dir}: a Fisher without class labels needs a causal language model, but "
            f"the model (architectures: {archs}) has no causal-LM head: {why}",
            hint='label the data ({"text": …, "label": 0}) for a sequence classifier, or use a '
            "causal LM; Gram statistics (potluck stats gram) need no head",
            architectures=archs,
        )
    return model, "causal_lm"


def _gram_model(model_dir: str | os.PathLike[str]) -> tuple[Any, str]:
    """Gram statistics need no loss: the class the config's architectures name (classifier or
    causal LM) when the checkpoint holds its head, else the bare ``AutoModel``."""
    archs = architectures(model_dir)
    tries: list[tuple[str, str]] = []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        tries.append((_CLASSIFIER, "classification"))
    if any(a.endswith(_LM_SUFFIXES) for a in archs):
        tries.append((_CAUSAL_LM, "causal_lm"))
    for auto_class, task in [*tries, ("AutoModel", "base")]:
        model, missing = load_pretrained(auto_class, model_dir)
        if model is not None and not missing:
            return model, task
    raise UserError(
        f"{model_dir}: not a complete transformers model: {_missing_text(missing)}"
        if model is not None
        else f"{model_dir}: transformers cannot build a model from its config.json",
        hint="point at a model directory saved with save_pretrained",
    )


def load_hf_model(
    model_dir: str | os.PathLike[str], kind: str, labels: str | None
) -> tuple[Any, str]:
    """(model, task) from a local model directory (never the hub; see docs/merging-stats.md).

    ``labels`` is the data's labels: ``"class"`` ([N]), ``"token"`` ([N, T]) or None. Fisher:
    class labels need a sequence classifier, otherwise a causal LM. Gram: the class the config's
    ``architectures`` name, falling back to the bare ``AutoModel``. A head whose weights the
    checkpoint lacks is never used (transformers would initialise it at random): Fisher refuses
    the model naming the missing weights, Gram falls back.
    """
    if kind == "fisher":
        return _fisher_model(model_dir, labels)
    return _gram_model(model_dir)


def _label_kind(batches: list[dict[str, torch.Tensor]]) -> str | None:
    """``"class"`` ([B] labels), ``"token"`` ([B, T]) or None (no labels)."""
    if not batches or "labels" not in batches[0]:
        return None
    return "class" if batches[0]["labels"].dim() == 1 else "token"


def _check_labels(model: Any, task: str, batches: list[dict[str, torch.Tensor]]) -> None:
    """Class labels must be classes of the classifier (``0 ≤ label < num_labels``)."""
    if task != "classification":
        return
    n = int(getattr(model.config, "num_labels", 0))
    bad = sorted({int(v) for b in batches for v in b["labels"].tolist() if not 0 <= int(v) < n})
    if bad:
        raise UserError(
            f"the data has label(s) {bad[:5]}, but the classifier has {n} classes (0…{n - 1})",
            hint="label the data with the classifier's class ids",
            labels=bad[:5],
        )


#: What the description records about the loss and Fisher variant, by (kind, task).
_LOSSES: dict[tuple[str, str], dict[str, str]] = {
    ("fisher", "classification"): {"loss": "classification_nll", "fisher": _EMPIRICAL},
    ("fisher", "causal_lm"): {"loss": "causal_lm_nll", "fisher": _EMPIRICAL},
}


def _compute(
    kind: str, model: Any, task: str, batches: list[dict[str, torch.Tensor]], embeddings: bool
) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """(statistics by parameter name, input axes of the Gram entries)."""
    if kind == "fisher":
        loss = classification_nll if task == "classification" else causal_lm_nll
        return fisher_diag(model, batches, loss), {}
    tensors = gram_matrices(model, batches, embeddings=embeddings)
    axes = input_axes(model, embeddings=embeddings)
    return tensors, {n: a for n, a in axes.items() if n in tensors}


def compute_stats(
    kind: str,
    model_dir: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    max_samples: int | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    device: str = "cpu",
    embeddings: bool = False,
) -> dict[str, Any]:
    """Compute ``kind`` statistics of the model in ``model_dir`` on ``data``; write ``out``.

    ``device`` is a torch device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``).
    ``embeddings`` (gram only): also the lookup counts of every embedding (see
    ``gram_matrices``), so that RegMean merges embedding rows by how much each model used them.
    Returns a summary (what ``potluck stats --json`` prints).
    """
    _check_args(kind, embeddings, batch_size, max_samples)
    batches, _has_labels = load_batches(data, model_dir, max_samples, batch_size, max_length)
    model, task = load_hf_model(model_dir, kind, _label_kind(batches))
    if kind == "fisher":
        _check_labels(model, task, batches)
    model = to_device(model, device)
    moved = [{k: v.to(model.device) for k, v in b.items()} for b in batches]
    tensors, axes = _compute(kind, model, task, moved, embeddings)
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    hashes = checkpoint_hashes(model_dir, tensors)
    description = {
        "tool": "potluck stats",
        "model": Path(model_dir).name,
        "task": task,
        **_settings(batch_size, max_length, device, data, embeddings),
        **_LOSSES.get((kind, task), {}),
    }
    data_hash = file_sha256(data)
    size = write_stats(
        out,
        kind,
        tensors,
        samples=samples,
        tokens=tokens,
        model_sha256=hashes,
        data_sha256=data_hash,
        input_axes=axes,
        description=description,
    )
    return {
        "path": str(out),
        "kind": kind,
        "task": task,
        "tensors": len(tensors),
        "samples": samples,
        "tokens": tokens,
        "bytes": size,
        "data_sha256": data_hash,
        "model_tensors_hashed": len(hashes),
    }


def _settings(
    batch_size: int, max_length: int, device: str, data: str | os.PathLike[str], embeddings: bool
) -> dict[str, Any]:
    """The run's settings as the statistics file's description records them."""
    return {
        "batch_size": batch_size,
        "max_length": max_length,
        "device": str(device),
        "data": Path(data).name,
        **({"embeddings": "lookup counts (diagonal Gram)"} if embeddings else {}),
    }


def _check_args(kind: str, embeddings: bool, batch_size: int, max_samples: int | None) -> None:
    """Refuse bad arguments (and a missing torch) before any data or model is loaded."""
    if kind not in ("fisher", "gram"):
        raise UserError(f"unknown statistics kind {kind!r}", hint="fisher or gram")
    if embeddings and kind != "gram":
        raise UserError("--embeddings applies to Gram statistics only", hint="potluck stats gram")
    require_torch("potluck stats")
    if batch_size < 1 or (max_samples is not None and max_samples < 1):
        raise UserError("--batch-size and --max-samples must be at least 1")
