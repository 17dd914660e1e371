"""Evaluation on the mixture of all tasks with the task identity hidden.

Protocol (every method sees the same texts, shuffled together, no task names):

* Each task keeps its own head (trained by its contributor with its expert). A prediction is
  a pair (task, class); it is correct only when both are right.
* **task hidden** (the table's main column): a router picks the head too: the head of the
  expert with the largest mean routing weight for that example (over all routed modules and
  its tokens, ``expert_usage``). Methods without a router or with a fixed mixture (base, single
  expert, merges, LoraHub's static weights) answer with the argmax over the concatenated logits
  of all heads (the joint label space).
* **joint argmax**: every method answers with the argmax over all heads' logits.
* **head given** (diagnostic only, not task-hidden): the right task's head is used, so only the
  class must be right; shows how much each encoder keeps of every task.
* The base row is a linear probe on the frozen base embedding over the joint label space,
  trained on all tasks' training data (a multitask reference that does see all data).

Accuracies are macro-averaged over tasks (each task counts the same).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import data, model


@dataclass(frozen=True)
class Mixture:
    """The shuffled test mixture: texts, task index and class index per example."""

    texts: list[str]
    task: np.ndarray
    label: np.ndarray
    task_names: list[str]


def draw(
    tasks: Sequence[data.Task], per_task: int, rng: np.random.Generator, split: str
) -> Mixture:
    """Up to ``per_task`` examples of each task's ``split`` (picked with ``rng``), task by task."""
    texts: list[str] = []
    tix: list[int] = []
    lab: list[int] = []
    for t, task in enumerate(tasks):
        part = getattr(task, split)
        pick = rng.permutation(len(part))[:per_task]
        texts += [part.texts[i] for i in pick]
        lab += [part.labels[i] for i in pick]
        tix += [t] * len(pick)
    return Mixture(texts, np.array(tix), np.array(lab), [t.name for t in tasks])


def mixture(tasks: Sequence[data.Task], per_task: int, seed: int) -> Mixture:
    """Up to ``per_task`` test examples of each task (seeded pick), shuffled together."""
    rng = np.random.default_rng(seed + 101)
    drawn = draw(tasks, per_task, rng, "test")
    order = rng.permutation(len(drawn.texts))
    texts = [drawn.texts[i] for i in order]
    return Mixture(texts, drawn.task[order], drawn.label[order], drawn.task_names)


def _toml(value: Any) -> str:
    """A TOML value: JSON scalars/strings/lists, and dicts as inline tables."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    return json.dumps(str(value) if isinstance(value, Path) else value)


def write_manifest(work: Path, lib: Path, names: Sequence[str], router: dict[str, Any]) -> Path:
    """A composition manifest (TOML) over the library for one router setting."""
    lines = [
        f"base = {json.dumps(str(model.model_dir()))}",
        f"library = {json.dumps(str(lib.resolve()))}",
        'model_class = "BertModel"',
        'aggregation = "output"',
        f"experts = {json.dumps([f'{n}@1.0' for n in names])}",
        "",
        "[router]",
    ]
    lines += [f"{k} = {_toml(v)}" for k, v in router.items()]
    tag = "-".join(f"{k}{v}" for k, v in router.items() if not isinstance(v, dict | str | Path))
    digest = hashlib.sha256(json.dumps(router, sort_keys=True, default=str).encode()).hexdigest()
    path = work / f"comp-{tag}-{digest[:10]}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _batches(tokenizer: Any, texts: Sequence[str], size: int) -> list[np.ndarray]:
    lengths = [len(x) for x in tokenizer(list(texts), truncation=True)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + size] for i in range(0, len(texts), size)]


def composed_outputs(
    manifest: Path,
    mix: Mixture,
    tokenizer: Any,
    task_names: Sequence[str] | None,
    max_length: int,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """(mean-pooled embeddings [N, d], expert usage [N, E]) of the composition on the mixture."""
    import torch

    from potluck.ops.compose.runtime import compose, expert_usage

    encoder: Any = model.load_encoder()
    composed = compose(manifest, model=encoder)
    emb = np.zeros((len(mix.texts), int(encoder.config.hidden_size)), np.float32)
    use = np.zeros((len(mix.texts), len(composed.names)))
    for idx in _batches(tokenizer, mix.texts, batch_size):
        enc = tokenizer(
            [mix.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        names = None if task_names is None else [task_names[i] for i in idx]
        with torch.inference_mode():
            out = composed(task_names=names, **enc)
        emb[idx] = model.mean_pool(out.last_hidden_state, enc["attention_mask"]).numpy()
        usage = expert_usage(composed, len(idx))
        use[idx] = [[u[n] for n in composed.names] for u in usage]
    return emb, use


def encoder_outputs(encoder: Any, mix: Mixture, tokenizer: Any, max_length: int) -> np.ndarray:
    """Mean-pooled embeddings of a plain encoder (base or a dense merge)."""
    return model.embed(encoder, tokenizer, mix.texts, max_length=max_length)


def head_logits(heads: Sequence[Any], emb: np.ndarray) -> list[np.ndarray]:
    """Each head's logits on the embeddings."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(emb)
        return [h(x).numpy().astype(np.float64) for h in heads]


def _macro(correct: np.ndarray, task: np.ndarray, n_tasks: int) -> float:
    return float(np.mean([correct[task == t].mean() for t in range(n_tasks)]))


def score(mix: Mixture, logits: list[np.ndarray], usage: np.ndarray | None) -> dict[str, Any]:
    """Accuracies (task hidden / joint argmax / head given) and, with usage, routing accuracy."""
    n_t = len(logits)
    offsets = np.cumsum([0] + [lg.shape[1] for lg in logits])
    joint = np.concatenate(logits, axis=1).argmax(1)
    j_task = np.searchsorted(offsets, joint, side="right") - 1
    j_ok = (j_task == mix.task) & (joint - offsets[j_task] == mix.label)
    own = np.array([logits[t][i].argmax() for i, t in enumerate(mix.task)])
    given_ok = own == mix.label
    out: dict[str, Any] = {
        "joint": _macro(j_ok, mix.task, n_t),
        "head_given": _macro(given_ok, mix.task, n_t),
        "per_task_joint": [float(j_ok[mix.task == t].mean()) for t in range(n_t)],
    }
    if usage is None:
        out["hidden"] = out["joint"]
        return out
    pick = usage.argmax(1)
    pred = np.array([logits[p][i].argmax() for i, p in enumerate(pick)])
    ok = (pick == mix.task) & (pred == mix.label)
    out["hidden"] = _macro(ok, mix.task, n_t)
    out["routing_acc"] = _macro(pick == mix.task, mix.task, n_t)
    out["per_task_hidden"] = [float(ok[mix.task == t].mean()) for t in range(n_t)]
    out["own_weight"] = float(np.mean(usage[np.arange(len(pick)), mix.task]))
    return out


def joint_probe(
    tasks: Sequence[data.Task],
    tokenizer: Any,
    encoder: Any,
    per_task: int,
    max_length: int,
    seed: int,
) -> list[Any]:
    """A linear probe over the joint label space on frozen embeddings, split back per task."""
    import torch

    rng = np.random.default_rng(seed + 202)
    xs, ys, off = [], [], 0
    for task in tasks:
        pick = rng.permutation(len(task.train))[:per_task]
        xs.append(
            model.embed(
                encoder, tokenizer, [task.train.texts[i] for i in pick], max_length=max_length
            )
        )
        ys.append(np.array([task.train.labels[i] for i in pick]) + off)
        off += len(task.label_names)
    x, y = torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    torch.manual_seed(seed)
    lin = torch.nn.Linear(x.shape[1], off)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2)
    for _ in range(400):
        loss = torch.nn.functional.cross_entropy(lin(x), y)
        opt.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
    heads, off = [], 0
    for task in tasks:
        k = len(task.label_names)
        h = torch.nn.Linear(x.shape[1], k)
        with torch.no_grad():
            h.weight.copy_(lin.weight[off : off + k])
            h.bias.copy_(lin.bias[off : off + k])
        heads.append(h)
        off += k
    return heads


def ties_encoder(lib: Path, names: Sequence[str], density: float) -> Any:
    """The base with the experts' dense deltas B·A merged by potluck's TIES (``ties``)."""
    import torch

    from potluck.merging import MERGE_METHODS
    from potluck.ops.compose.library import expert_deltas, find_expert

    encoder = model.load_encoder()
    state = encoder.state_dict()
    deltas = [expert_deltas(find_expert(lib, f"{n}@1.0").patch_path) for n in names]
    ties = MERGE_METHODS.get("ties")
    for tensor in sorted(deltas[0]):
        base = state[tensor].double().numpy()
        fts = []
        for d in deltas:
            e = d[tensor]
            assert e.a is not None and e.b is not None
            fts.append(base + np.asarray(e.b, np.float64) @ np.asarray(e.a, np.float64))
        merged = ties.merge(fts, base, None, name=tensor, seed=0, density=density)
        state[tensor] = torch.from_numpy(merged.astype(np.float32))
    encoder.load_state_dict(state)
    return encoder
