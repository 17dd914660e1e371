"""Data and models for the torch-based operations (``potluck stats``, ``patch create --eval``):
JSONL / npz data files read into token batches, the tensor hashes of a model directory, and the
check that the ``stats`` extra is installed. torch / transformers are imported inside functions
only, never at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.errors import UserError
from potluck.formats import scan_file

if TYPE_CHECKING:
    import torch


def read_jsonl(
    path: str | os.PathLike[str], max_samples: int | None
) -> tuple[list[str], list[int] | None]:
    """Texts and labels of a ``{"text": …, "label": int?}`` per line file (labels: all or none)."""
    texts: list[str] = []
    labels: list[int] = []
    with Path(path).open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if max_samples is not None and len(texts) >= max_samples:
                break
            row = _jsonl_row(path, lineno, line)
            if texts and ("label" in row) != bool(labels):
                raise UserError(
                    f'{path}:{lineno}: some lines have a "label", others not',
                    hint="label every line, or none",
                )
            if "label" in row:
                labels.append(row["label"])
            texts.append(row["text"])
    return texts, (labels if labels else None)


def _jsonl_row(path: str | os.PathLike[str], lineno: int, line: str) -> dict[str, Any]:
    where = f"{path}:{lineno}"
    try:
        row = json.loads(line)
    except ValueError:
        raise UserError(f"{where}: not JSON", hint="one JSON object per line") from None
    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
        raise UserError(f'{where}: no "text" string', hint='write {"text": "...", "label": 0}')
    label = row.get("label")
    if "label" in row and (isinstance(label, bool) or not isinstance(label, int)):
        raise UserError(f'{where}: "label" must be an integer, got {label!r}')
    return row


def read_npz(path: str | os.PathLike[str], max_samples: int | None) -> dict[str, np.ndarray]:
    """``input_ids`` [N, T], ``attention_mask`` [N, T] (default: ones), ``labels`` [N] or [N, T]."""
    with np.load(path, allow_pickle=False) as z:
        data = {k: np.asarray(z[k]) for k in z.files}
    if (
        "input_ids" not in data
        or data["input_ids"].ndim != 2
        or data["input_ids"].dtype.kind not in "iu"
    ):
        raise UserError(f"{path}: needs an integer 'input_ids' array of shape [N, T]")
    ids = data["input_ids"]
    data.setdefault("attention_mask", np.ones_like(ids))
    unknown = sorted(set(data) - {"input_ids", "attention_mask", "labels"})
    if unknown or data["attention_mask"].shape != ids.shape:
        raise UserError(
            f"{path}: unexpected arrays {unknown} or attention_mask shape",
            hint="input_ids, attention_mask, labels",
        )
    if "labels" in data and data["labels"].shape not in ((len(ids),), ids.shape):
        raise UserError(f"{path}: labels must be [N] or [N, T]")
    n = len(ids) if max_samples is None else min(len(ids), max_samples)
    return {k: v[:n] for k, v in data.items()}


def _npz_batches(
    data: Mapping[str, np.ndarray], batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    import torch

    n = len(data["input_ids"])
    for start in range(0, n, batch_size):
        yield {
            k: torch.from_numpy(v[start : start + batch_size].astype(np.int64))
            for k, v in data.items()
        }


def _text_batches(
    texts: list[str], labels: list[int] | None, tokenizer: Any, batch_size: int, max_length: int
) -> Iterator[dict[str, torch.Tensor]]:
    import torch

    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if labels is not None:
            batch["labels"] = torch.tensor(labels[start : start + batch_size], dtype=torch.long)
        yield batch


def checkpoint_hashes(model_dir: str | os.PathLike[str], names: Iterable[str]) -> dict[str, str]:
    """{name: sha256 of the tensor's bytes} for ``names`` found in the directory's safetensors.

    A safetensors tensor is stored little-endian in C order, so the sha256 of its raw bytes is
    ``tensors.digests.tensor_sha256`` of the tensor.
    """
    wanted = set(names)
    out: dict[str, str] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        layout = scan_file(path)
        with path.open("rb") as f:
            for seg in layout.tensor_segments():
                if seg.name in wanted:
                    f.seek(seg.offset)
                    out[seg.name] = hashlib.sha256(f.read(seg.length)).hexdigest()
    return out


def load_batches(
    data: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    max_samples: int | None,
    batch_size: int,
    max_length: int,
) -> tuple[list[dict[str, torch.Tensor]], bool]:
    """All batches of the data file (tokenized with the model's tokenizer for JSONL)."""
    if str(data).endswith(".npz"):
        arrays = read_npz(data, max_samples)
        return list(_npz_batches(arrays, batch_size)), "labels" in arrays
    import transformers

    texts, labels = read_jsonl(data, max_samples)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    return list(_text_batches(texts, labels, tokenizer, batch_size, max_length)), labels is not None


def load_pretrained(auto_class: str, model_dir: str | os.PathLike[str]) -> tuple[Any, list[str]]:
    """``transformers.<auto_class>.from_pretrained(model_dir)`` offline, and the names of the
    weights it needs that the checkpoint lacks (transformers initialises those at random, so a
    caller must refuse or fall back: a random head is never a result). A class that does not fit
    the config (``ValueError``) comes back as ``(None, [])``. transformers' own load report is
    silenced (and its progress bars); the caller names what is missing."""
    import transformers

    cls = getattr(transformers, auto_class, None)
    if cls is None:
        raise UserError(f"transformers has no {auto_class!r}", hint="check the model class name")
    logs: Any = transformers.logging  # its helpers are untyped
    level = logs.get_verbosity()
    bars = logs.is_progress_bar_enabled()
    logs.set_verbosity_error()
    logs.disable_progress_bar()
    try:
        model, info = cls.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True
        )
    except ValueError:
        return None, []
    except OSError as e:
        raise UserError(
            f"{model_dir}: cannot load the model ({e})", hint="check the model directory"
        ) from None
    finally:
        logs.set_verbosity(level)
        if bars:
            logs.enable_progress_bar()
    return model, sorted(info.get("missing_keys") or [])


def architectures(model_dir: str | os.PathLike[str]) -> list[str]:
    """The ``architectures`` of the directory's ``config.json`` (empty when it names none)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text("utf-8"))
    except (OSError, ValueError):
        return []
    archs = config.get("architectures") if isinstance(config, dict) else None
    return [str(a) for a in archs] if isinstance(archs, list) else []


def to_device(model: Any, device: str) -> Any:
    import torch

    try:
        return model.to(torch.device(device))
    except (RuntimeError, AssertionError, ValueError) as e:
        raise UserError(f"cannot use device {device!r}: {e}", hint="try --device cpu") from None


def require_torch(what: str) -> None:
    """A ``UserError`` naming the ``stats`` extra when torch or transformers is missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise UserError(
            f"{what} needs PyTorch and transformers ({e.name} is not installed)",
            hint="install the stats extra: pip install 'potluck[stats]'",
        ) from None
