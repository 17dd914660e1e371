"""``patch create --check --eval FILE``: the change in a model's outputs that a patch causes.

The model in TARGET's directory is run on the eval inputs twice: with the exact TARGET weights
and with the weights the patch reproduces (``apply_patch`` on BASE, written to a temporary
safetensors file next to the patch). The per-example outputs compared are the logits of a
sequence classifier, the logits of a causal LM mean-pooled over non-padding tokens, or else the
bare model's last hidden state mean-pooled the same way (``check.compare_outputs``).

The only module besides ``stats_torch`` importing torch / transformers, always inside functions.
The eval file formats (JSONL texts, npz ``input_ids``/``attention_mask``) and their readers are
those of ``potluck stats`` (``stats_torch``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.errors import UserError
from potluck.formats.safetensors import write_safetensors
from potluck.ops.models.sources import CONFIG_FILES, ModelSource
from potluck.ops.models.torchdata import load_batches, load_pretrained, require_torch
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.check import OutputChange, compare_outputs

if TYPE_CHECKING:
    import torch

__all__ = [
    "HEADS",
    "check_eval_sizes",
    "check_eval_target",
    "eval_patch",
    "head_output",
    "load_model",
    "model_outputs",
    "pick_head",
    "target_directory",
    "torch_threads",
]

#: (transformers auto class, task, what the per-example output vector is), by head.
HEADS = {
    "classification": ("AutoModelForSequenceClassification", "logits"),
    "causal_lm": ("AutoModelForCausalLM", "mean-pooled logits"),
    "base": ("AutoModel", "mean-pooled last hidden state"),
}


def check_eval_target(target: ModelSource) -> Path:
    """TARGET's directory holding ``config.json`` (a ``UserError`` if none, or without torch)."""
    cfg_dir = target.config_dir
    if cfg_dir is None or not (cfg_dir / "config.json").is_file():
        raise UserError(
            f"--eval needs TARGET to be a Hugging Face model with a config.json; "
            f"{target.label} has none",
            hint="point TARGET at a model directory (config.json + weights), or drop --eval",
            model=target.label,
        )
    require_torch("--eval")
    return cfg_dir


def pick_head(config_dir: str | os.PathLike[str]) -> str:
    """``classification``, ``causal_lm`` or ``base`` from the config's ``architectures``."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_dir, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classification"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal_lm"
    return "base"


def _pooled(out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``mask`` is 1 of [B, T, D] ``out``, in float64."""
    import torch

    m = mask.to(torch.float64).unsqueeze(-1)
    return (out.to(torch.float64) * m).sum(1) / m.sum(1).clamp(min=1.0)


def model_outputs(model: Any, head: str, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """[N, D] float64 per-example outputs of ``model`` (eval mode, no grad; see module doc)."""
    import torch

    model.eval()
    rows = []
    with torch.no_grad():
        for batch in batches:
            ids, mask = batch["input_ids"], batch["attention_mask"]
            rows.append(head_output(model(input_ids=ids, attention_mask=mask), head, mask))
    return torch.cat(rows).numpy() if rows else np.zeros((0, 0))


def head_output(out: Any, head: str, mask: torch.Tensor) -> torch.Tensor:
    """[B, D] float64 per-example outputs of one forward's result ``out`` (module doc)."""
    import torch

    if head == "classification":
        logits: torch.Tensor = out.logits.to(torch.float64)
        return logits
    if head == "causal_lm":
        return _pooled(out.logits, mask)
    return _pooled(out.last_hidden_state, mask)


def load_model(model_dir: Path, head: str) -> Any:
    """The model of ``model_dir`` with the transformers class of ``head`` (``pick_head``),
    loaded quietly; weights the checkpoint lacks (transformers would draw them at random) are
    a ``UserError`` naming them."""
    model, missing = load_pretrained(HEADS[head][0], model_dir)
    if model is None or missing:
        what = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise UserError(
            f"{model_dir}: the checkpoint does not fit its config"
            + (f" (missing {what})" if missing else ""),
            hint="check that config.json belongs to these weights",
        )
    return model


def _run(model_dir: Path, head: str, batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    return model_outputs(load_model(model_dir, head), head, batches)


def _copy_config(src: Path, dst: Path) -> None:
    for name in CONFIG_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def target_directory(target: ModelSource, cfg_dir: Path, tmp: Path) -> Path:
    """TARGET's directory on disk, or a temporary one with its tensors and config files."""
    if Path(target.label).is_dir():
        return Path(target.label)
    out = tmp / "target"
    out.mkdir()
    names = target.names()
    specs = [(n, target.info(n).dtype, target.info(n).shape) for n in names]
    write_safetensors(out / "model.safetensors", specs, (target.read(n) for n in names))
    _copy_config(cfg_dir, out)
    return out


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads, restoring the count afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_eval_sizes(max_samples: int, batch_size: int, threads: int) -> None:
    """Refuse an ``--eval`` run with fewer than one example, batch item or thread."""
    if min(max_samples, batch_size, threads) < 1:
        raise UserError("--eval-max, the batch size and --threads must be at least 1")


def eval_patch(
    base: ModelSource,
    target: ModelSource,
    patch_path: str | os.PathLike[str],
    data: str | os.PathLike[str],
    *,
    max_samples: int = 64,
    batch_size: int = 8,
    max_length: int = 512,
    threads: int = 2,
) -> OutputChange:
    """The change in the outputs of TARGET's model when its weights are what the patch rebuilds.

    ``data`` is a JSONL (``{"text": …}`` per line, tokenized with TARGET's tokenizer) or npz
    (``input_ids``, ``attention_mask``) file, read up to ``max_samples`` examples. The patched
    weights come from ``apply_patch`` (BASE + decoded payloads, hash-checked), written to a
    temporary directory next to the patch and removed afterwards. Runs on the CPU with
    ``threads`` torch threads (restored afterwards), in eval mode without gradients.
    """
    cfg_dir = check_eval_target(target)
    check_eval_sizes(max_samples, batch_size, threads)
    head = pick_head(cfg_dir)
    batches, _labels = load_batches(data, cfg_dir, max_samples, batch_size, max_length)
    if not batches:
        raise UserError(f"{data}: no examples to evaluate", hint="check the --eval file")
    parent = Path(patch_path).resolve().parent
    with (
        tempfile.TemporaryDirectory(prefix=".potluck-eval-", dir=parent) as tmp_name,
        torch_threads(threads),
    ):
        tmp = Path(tmp_name)
        want = _run(target_directory(target, cfg_dir, tmp), head, batches)
        patched = tmp / "patched"
        patched.mkdir()
        apply_patch(base, patch_path, patched / "model.safetensors", directory=False, card=False)
        _copy_config(cfg_dir, patched)
        got = _run(patched, head, batches)
    return compare_outputs(
        want, got, task=head, output=HEADS[head][1], classify=head == "classification"
    )
