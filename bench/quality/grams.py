"""A contributor's Gram statistics through ``potluck stats gram`` (``compute_stats``).

RegMean needs no labels and no head: the Gram matrices XᵀX of every linear layer's inputs over
the non-padding tokens of unlabelled texts. The bench computes them the way a user would, with
potluck's public statistics path (``potluck.ops.merge.stats_torch.compute_stats``, what the
CLI runs) on a Hugging Face model directory: the shipped ``config.json`` and tokenizer files
next to the contributor's encoder as ``model.safetensors`` (``AutoModel`` → ``BertModel``, the
encoder the bench scores), and a JSONL of the task's first ``n`` **training** texts, written
without labels. ``embeddings=True`` is ``potluck stats gram --embeddings`` (RegMean over the
embeddings from their lookup counts, the bench's ``regmean_emb``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import model

#: The shipped model directory's files a ``BertModel`` directory needs besides its weights.
MODEL_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
)
BATCH_SIZE = 16


def link_file(src: Path, dst: Path) -> Path:
    """``dst`` as a hard link of ``src`` (a copy where links fail); kept when it already is
    that file."""
    if dst.exists() and os.path.samefile(dst, src):
        return dst
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
    return dst


def model_folder(encoder: Path, folder: Path) -> Path:
    """``folder``: a Hugging Face model directory of ``encoder`` (config and tokenizer files of
    the shipped model, ``encoder`` as ``model.safetensors``)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in MODEL_FILES:
        link_file(model.model_dir() / name, folder / name)
    link_file(encoder, folder / "model.safetensors")
    return folder


def texts_jsonl(texts: Sequence[str], path: Path) -> Path:
    """``path``: one ``{"text": …}`` line per text (no labels)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": t}, ensure_ascii=False) for t in texts)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def gram_stats(
    encoder: Path, texts: Sequence[str], out: Path, *, embeddings: bool, max_length: int
) -> dict[str, Any]:
    """Write ``out``, the Gram statistics of ``encoder`` on ``texts`` (in batches of
    ``BATCH_SIZE``, truncated to ``max_length`` tokens) with ``compute_stats``; its summary.
    The model directory and JSONL are made next to ``out`` and removed afterwards."""
    from potluck.ops.merge.stats_torch import compute_stats

    work = out.with_name(out.name + ".inputs")
    try:
        folder = model_folder(encoder, work / "model")
        data = texts_jsonl(texts, work / "train.jsonl")
        return compute_stats(
            "gram", folder, data, out,
            batch_size=BATCH_SIZE, max_length=max_length, embeddings=embeddings,
        )  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
