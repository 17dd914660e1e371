"""``tokenizer_source`` / ``tokenizer:``: merge models whose vocabularies differ, as mergekit does.

The output vocabulary is the base model's (``base``), one model's (a model path), or the union
(``union``: the base's tokens, then every other model's tokens it lacks, in each model's id
order). Every vocabulary tensor (``embed_tokens``, ``lm_head``, ``wte``, ``word_embeddings``,
``embed_out``: those whose first axis is the model's vocabulary) of every input is re-indexed to
the output vocabulary before merging; the row of a token a model lacks is filled as mergekit
fills it (``mergekit/tokenizer/embed.py``): the one model that has it gives its row; no model
has it: zeros; the base has it: the base's row; else the mean of the rows of the models that
have it. ``pad_to_multiple_of`` appends rows, each the mean of the model's (re-indexed) rows.

Vocabularies are read from each model's ``tokenizer.json`` (the ``model.vocab`` of WordLevel,
WordPiece, BPE or Unigram, plus ``added_tokens``); tokens with an id at or above the model's
``config.json`` ``vocab_size`` are unused (as mergekit's ``get_stripped_tokenizer``). The output
gets ``tokenizer.json`` (union: the base's, the new tokens appended as added tokens), the source
model's tokenizer files (a model) and ``config.json`` with the new ``vocab_size``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.errors import UserError
from potluck.ops.models.sources import ModelSource, TensorInfo

if TYPE_CHECKING:
    from potluck.ops.merge.plan import TensorJob

__all__ = ["VocabPlan", "align_job", "align_vocab", "plan_vocabulary", "tokenizer_files"]

SOURCES = ("union", "base")
_VOCAB_TENSOR = re.compile(
    r"(?:^|\.)(?:embed_tokens|lm_head|wte|word_embeddings|embed_out)\.weight$"
)
_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


@dataclass(frozen=True)
class Vocab:
    """One model's tokens (token → id, ids below ``size`` only) and its tokenizer directory."""

    model: str
    ids: dict[str, int]
    size: int
    where: Path


@dataclass(frozen=True)
class VocabPlan:
    """The output vocabulary (``tokens`` in id order, ``rows`` ≥ len(tokens) after padding),
    each input model's row per output token (−1: it lacks the token), the base's reference and
    the vocabulary tensors' names."""

    source: str
    tokens: tuple[str, ...]
    rows: int
    rows_of: Mapping[str, np.ndarray]
    base: str
    tensors: frozenset[str]
    home: Vocab

    def out_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """The merged shape of vocabulary tensor ``name`` (None: not a vocabulary tensor)."""
        return (self.rows, *shape[1:]) if name in self.tensors else None


def read_vocab(model: str, where: Path | None) -> Vocab:
    """``tokenizer.json`` of ``where``: token → id (added tokens included), ids < vocab_size."""
    path = None if where is None else where / "tokenizer.json"
    if path is None or not path.is_file():
        raise UserError(
            f"{model} has no tokenizer.json, so its vocabulary cannot be aligned",
            hint="tokenizer_source needs every model's tokenizer.json (Hugging Face fast "
            "tokenizer); add it, or drop tokenizer_source when all vocabularies are the same",
            model=model,
        )
    data = json.loads(path.read_text())
    vocab = data.get("model", {}).get("vocab", {})
    ids = dict(vocab) if isinstance(vocab, dict) else {p[0]: i for i, p in enumerate(vocab)}
    for entry in data.get("added_tokens") or []:
        ids[entry["content"]] = int(entry["id"])
    _check_unique(model, ids)
    size = _config_vocab_size(where) or len(ids)
    assert where is not None
    return Vocab(model, {t: i for t, i in ids.items() if i < size}, size, where)


def _check_unique(model: str, ids: Mapping[str, int]) -> None:
    seen: dict[int, str] = {}
    for tok, i in ids.items():
        if i in seen:
            raise UserError(
                f"{model}: tokens {seen[i]!r} and {tok!r} have the same id {i}, so its "
                "vocabulary cannot be aligned",
                hint="fix the model's tokenizer.json",
                model=model,
                token=tok,
            )
        seen[i] = tok


def _config_vocab_size(where: Path | None) -> int | None:
    cfg = None if where is None else where / "config.json"
    if cfg is None or not cfg.is_file():
        return None
    size = json.loads(cfg.read_text()).get("vocab_size")
    return size if isinstance(size, int) else None


def _source_vocab(source: str, sources: Mapping[str, ModelSource]) -> Vocab:
    """The vocabulary of a model named as ``tokenizer_source`` (an input or another model)."""
    src = sources.get(source)
    return read_vocab(source, src.config_dir if src is not None else Path(source))


def _output_tokens(
    source: str, base: Vocab, vocabs: Sequence[Vocab], sources: Mapping[str, ModelSource]
) -> list[str]:
    """The output vocabulary in id order (see the module docstring)."""
    if source not in SOURCES:
        return _in_id_order(_source_vocab(source, sources))
    tokens = _in_id_order(base)
    if source == "union":
        have = set(tokens)
        for v in vocabs:
            new = [t for t in _in_id_order(v) if t not in have]
            tokens += new
            have.update(new)
    return tokens


def _in_id_order(v: Vocab) -> list[str]:
    order = sorted(v.ids, key=v.ids.__getitem__)
    for want, tok in enumerate(order):
        if v.ids[tok] != want:
            raise UserError(
                f"{v.model}: no token has id {want} (next is {tok!r} with id {v.ids[tok]}), so "
                "its vocabulary cannot be aligned",
                hint="token ids of a tokenizer must be 0, 1, 2, … without gaps",
                model=v.model,
                token=tok,
            )
    return order


def plan_vocabulary(
    source: str | None,
    pad_to_multiple_of: int | None,
    base: str,
    sources: Mapping[str, ModelSource],
) -> VocabPlan | None:
    """The vocabulary plan for ``tokenizer_source`` ``source`` (None: no alignment)."""
    if source is None:
        return None
    if source not in SOURCES and source not in sources and not Path(source).is_dir():
        raise UserError(
            f"tokenizer_source: {source!r} is not union, base or a model directory",
            hint="tokenizer_source: union | base | PATH of a model with a tokenizer.json",
            value=source,
        )
    vocabs = [read_vocab(ref, src.config_dir) for ref, src in sources.items()]
    by_ref = {v.model: v for v in vocabs}
    tokens = _output_tokens(source, by_ref[base], vocabs, sources)
    rows = len(tokens)
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    rows_of = {v.model: np.array([v.ids.get(t, -1) for t in tokens], np.int64) for v in vocabs}
    tensors = _vocab_tensors(by_ref, sources)
    home = by_ref[base] if source in SOURCES else _source_vocab(source, sources)
    return VocabPlan(source, tuple(tokens), rows, rows_of, base, tensors, home)


def _vocab_tensors(
    by_ref: Mapping[str, Vocab], sources: Mapping[str, ModelSource]
) -> frozenset[str]:
    """Names of the vocabulary tensors; each model's must have a row for each of its ids."""
    names: set[str] = set()
    for ref, src in sources.items():
        for name in src.names():
            info = src.info(name)
            if _VOCAB_TENSOR.search(name) and info.shape:
                _check_rows(by_ref[ref], info)
                names.add(name)
    return frozenset(names)


def _check_rows(v: Vocab, info: TensorInfo) -> None:
    top = max(v.ids.items(), key=lambda kv: kv[1], default=None)
    if top is not None and top[1] >= info.shape[0]:
        raise UserError(
            f"{v.model}: token {top[0]!r} has id {top[1]}, but {info.name} has only "
            f"{info.shape[0]} rows, so its vocabulary cannot be aligned",
            hint="the tokenizer does not belong to these weights (check config.json vocab_size)",
            model=v.model,
            token=top[0],
            tensor=info.name,
        )


def align_job(
    plan: VocabPlan | None, job: TensorJob, models: list[np.ndarray], base: np.ndarray | None
) -> tuple[list[np.ndarray], np.ndarray | None]:
    """A merge job's inputs, re-indexed to the output vocabulary (``align_vocab``)."""
    if plan is None or job.models[0][1] not in plan.tensors:
        return models, base
    refs = [m for m, _ in job.models]
    arrays = list(models)
    if job.base is not None and base is not None:
        refs.append(job.base[0])
        arrays.append(base)
    out = align_vocab(plan, job.models[0][1], refs, arrays)
    return out[: len(models)], (out[-1] if len(out) > len(models) else None)


def align_vocab(
    plan: VocabPlan | None,
    name: str,
    refs: Sequence[str],
    arrays: Sequence[np.ndarray],
) -> list[np.ndarray]:
    """The job's inputs (models ``refs``, tensors ``arrays``) re-indexed to the output vocabulary
    when ``name`` is a vocabulary tensor, else unchanged."""
    if plan is None or name not in plan.tensors:
        return list(arrays)
    perms = np.stack([plan.rows_of[r] for r in refs])
    has = perms >= 0
    need = np.flatnonzero(~has.all(axis=0))  # tokens some model lacks: only these are filled
    fill = _fill_rows(plan, refs, arrays, perms[:, need], has[:, need])
    out = []
    for a, p, h in zip(arrays, perms, has, strict=True):
        new = np.empty((plan.rows, *a.shape[1:]), dtype=a.dtype)  # the inputs' dtype, as mergekit
        new[: len(p)][h] = a[p[h]]
        lack = ~h[need]
        new[need[lack]] = fill[lack]
        if plan.rows > len(p):
            new[len(p) :] = new[: len(p)].mean(axis=0, dtype=np.float64)  # mergekit: the mean row
        out.append(new)
    return out


def _fill_rows(
    plan: VocabPlan,
    refs: Sequence[str],
    arrays: Sequence[np.ndarray],
    perms: np.ndarray,
    has: np.ndarray,
) -> np.ndarray:
    """Row per token (columns of ``perms``/``has``) for the models that lack it: the one model
    that has it, else the base's, else the mean of those that have it (none: zeros)."""
    count = has.sum(axis=0)
    fill = np.zeros((perms.shape[1], *arrays[0].shape[1:]), dtype=np.float64)
    for i, a in enumerate(arrays):
        fill[has[i]] += a[perms[i][has[i]]]
    fill /= np.maximum(count, 1).reshape(-1, *([1] * (fill.ndim - 1)))
    if plan.base in refs:
        b = list(refs).index(plan.base)
        use = has[b] & (count > 1)
        fill[use] = arrays[b][perms[b][use]]
    return fill


def tokenizer_files(plan: VocabPlan | None, config_json: str | None) -> dict[str, str]:
    """The output's tokenizer files and ``config.json`` (name → text) for ``plan``."""
    if plan is None:
        return {}
    files: dict[str, str] = {}
    if plan.source == "union":
        files.update(_union_files(plan))
    elif plan.source != "base":
        for name in _TEXT_FILES:
            if (plan.home.where / name).is_file():
                files[name] = (plan.home.where / name).read_text()
    if config_json is not None:
        data = json.loads(config_json)
        data["vocab_size"] = plan.rows
        files["config.json"] = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return files


def _union_files(plan: VocabPlan) -> dict[str, str]:
    """The base's tokenizer.json (and tokenizer_config.json) with the new tokens added."""
    home = plan.home
    data: dict[str, Any] = json.loads((home.where / "tokenizer.json").read_text())
    new = [(i, t) for i, t in enumerate(plan.tokens) if t not in home.ids]
    added = data.setdefault("added_tokens", [])
    entries = [_added(i, t) for i, t in new]
    added.extend(entries)
    files = {"tokenizer.json": json.dumps(data, indent=2, ensure_ascii=False) + "\n"}
    cfg_path = home.where / "tokenizer_config.json"
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        if isinstance(cfg.get("added_tokens_decoder"), dict):
            for e in entries:
                cfg["added_tokens_decoder"][str(e["id"])] = {
                    k: v for k, v in e.items() if k != "id"
                }
        files["tokenizer_config.json"] = json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    return files


def _added(i: int, token: str) -> dict[str, Any]:
    """An added (not special) token, as ``tokenizer.add_tokens`` records it."""
    return {
        "id": i,
        "content": token,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": False,
    }
