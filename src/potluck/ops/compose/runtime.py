"""Torch runtime of a composition: a Hugging Face model whose adapted linears route among experts.

``compose(manifest_or_lock)`` loads the base with ``transformers.<model_class>.from_pretrained``
(or takes ``model=``), checks the base tensors the experts pin, and replaces every targeted
``nn.Linear`` by an ``ExpertLinear`` container holding the experts' stacked factors
``A [E, r, in]``, ``B [E, out, r]`` (zero-padded ranks, zeros for experts that do not adapt the
module), (IA)³ scale offsets and bias deltas. A forward pass routes the layer input with the
composition's numpy router (``potluck.modular``; one call per layer, no loop over experts) and
adds, batched with einsum,

* ``output`` aggregation: Σₑ wₜₑ·Bₑ·Aₑ·xₜ (computed as one [T, E·r] × [E·r, out] product);
* ``parameters`` aggregation (SMEAR): (Σₑ wₜₑBₑ)(Σₑ wₜₑAₑ)·xₜ.

Routing is inference-only (the router sees detached float64 copies of the states). torch and
transformers are imported lazily, only here.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from potluck.errors import UserError
from potluck.modular import ROUTERS, RouteContext, Router, dense_weights
from potluck.ops.compose.library import (
    ExpertDelta,
    ExpertRecord,
    base_mismatches,
    expert_deltas,
    load_artifact,
    mismatch_error,
    read_safetensors,
)
from potluck.ops.compose.manifest import (
    Composition,
    Opener,
    default_weights,
    export_mixture,
    load_composition,
    module_of,
    selected_deltas,
)
from potluck.ops.models.sources import open_path
from potluck.ops.models.torchdata import load_pretrained
from potluck.ops.patch.fileformat import read_patch

__all__ = [
    "compose",
    "expert_usage",
    "gate_expert",
    "load_model",
    "load_tokenizer",
    "run_texts",
    "text_batches",
    "train_gates",
]


Pair = tuple[ExpertDelta | None, ExpertDelta | None]  # (weight delta, bias delta) of a module


class _Stacks:
    """Per-module expert arrays (numpy) before they become torch buffers."""

    def __init__(self, out_f: int, in_f: int, bias: np.ndarray | None, pairs: list[Pair]) -> None:
        n = len(pairs)
        ranks = [w.a.shape[0] for w, _b in pairs if w is not None and w.a is not None]
        r = max(ranks, default=0)
        self.a = np.zeros((n, r, in_f), np.float64)
        self.b = np.zeros((n, out_f, r), np.float64)
        self.s_out = np.zeros((n, out_f), np.float64)
        self.s_in = np.zeros((n, in_f), np.float64)
        self.bias = np.zeros((n, out_f), np.float64)
        for e, (w, bd) in enumerate(pairs):
            if w is not None and w.kind == "factors" and w.a is not None and w.b is not None:
                self.a[e, : w.a.shape[0]] = w.a
                self.b[e, :, : w.b.shape[1]] = w.b
            elif w is not None and w.kind == "ia3" and w.scales is not None:
                (self.s_out if w.axis == 0 else self.s_in)[e] = np.asarray(w.scales) - 1.0
            if bd is not None:
                self.bias[e] = _bias_delta(bd, bias)


def _bias_delta(d: ExpertDelta, bias: np.ndarray | None) -> np.ndarray:
    if d.kind == "dense" and d.delta is not None:
        return np.asarray(d.delta, np.float64)
    if d.kind == "ia3" and d.scales is not None and bias is not None:
        return bias.astype(np.float64) * (np.asarray(d.scales, np.float64) - 1.0)
    raise UserError("a bias update without a base bias", hint="check the expert's base")


def _settings(comp: Composition, names: list[str], weights: Mapping[str, float]) -> dict[str, Any]:
    r = comp.router
    out: dict[str, Any] = {k: r.get(k) for k in ("top_k", "temperature", "granularity")}
    out["granularity"] = out["granularity"] or "token"
    if out["top_k"] is not None:  # after disable(): at most the experts left
        out["top_k"] = min(int(out["top_k"]), len(names))
    out["weights"] = [float(weights.get(n, 0.0)) for n in names]
    by_name = {rec.name: rec for rec in comp.experts}
    out["tasks"] = [by_name[n].tasks for n in names]
    return out


def _router_for(
    comp: Composition,
    recs: list[ExpertRecord],
    weight: str,
    settings: dict[str, Any],
    router_arrays: Mapping[str, np.ndarray],
) -> Router:
    strategy = str(comp.router["strategy"])
    cls = ROUTERS.get(strategy)
    kind = {"arrow": "arrow", "phatgoose": "phatgoose"}.get(strategy)
    arts: list[np.ndarray | None] = []
    for rec in recs:
        if kind is None:
            arts.append(None)
            continue
        table = load_artifact(rec, kind)
        if weight not in table:
            raise UserError(
                f"expert {rec.ref} has no {kind} artifact for {weight!r}",
                hint="every expert must adapt every routed module; narrow router.layers "
                "(modules outside it get no expert update) and re-run compose lock",
                expert=rec.ref,
                tensor=weight,
            )
        arts.append(table[weight])
    s = dict(settings)
    if strategy in ("learned", "smear"):
        s["router_weight"] = router_arrays.get(f"{weight}/weight")
        s["router_bias"] = router_arrays.get(f"{weight}/bias")
    return cls.build(len(recs), s, arts)


def _mixed_delta(
    x2: Any, wt: Any, buf: dict[str, Any], flags: dict[str, bool], base: Any, aggregation: str
) -> Any:
    """The experts' update of a linear's output for tokens ``x2 [T, in]`` and weights ``wt``."""
    import torch

    out = torch.zeros(x2.shape[0], base.out_features, dtype=x2.dtype, device=x2.device)
    a, b = buf["a"], buf["b"]
    if flags["a"] and aggregation == "parameters":  # SMEAR: (Σ w B)(Σ w A) x
        z = torch.einsum("ti,te,eri->tr", x2, wt, a)
        out = out + torch.einsum("tr,te,eor->to", z, wt, b)
    elif flags["a"]:  # Σ w B A x as one [T, E·r] × [E·r, out] product
        e, r = a.shape[0], a.shape[1]
        z = torch.einsum("ti,eri->ter", x2, a) * wt[:, :, None]
        b_cat = b.permute(1, 0, 2).reshape(b.shape[1], e * r)
        out = out + z.reshape(x2.shape[0], e * r) @ b_cat.T
    if flags["s_out"]:
        out = out + (x2 @ base.weight.T) * (wt @ buf["s_out"])
    if flags["s_in"]:
        out = out + (x2 * (wt @ buf["s_in"])) @ base.weight.T
    if flags["bias"]:
        out = out + wt @ buf["bias"]
    return out


@functools.cache
def _container_class() -> type[Any]:
    import torch
    from torch import nn

    class ExpertLinear(nn.Module):  # type: ignore[misc]
        """An ``nn.Linear`` plus routed low-rank / (IA)³ experts (see the module doc)."""

        def __init__(
            self,
            base: Any,
            name: str,
            experts: list[str],
            stacks: _Stacks,
            router: Router,
            aggregation: str,
            state: dict[str, Any],
        ) -> None:
            super().__init__()
            self.base, self.name, self.experts = base, name, list(experts)
            self.router, self.aggregation, self.state = router, aggregation, state
            self.last: dict[str, np.ndarray] = {}
            self.set_stacks(stacks)

        def set_stacks(self, st: _Stacks) -> None:
            dt, dev = self.base.weight.dtype, self.base.weight.device
            for key in ("a", "b", "s_out", "s_in", "bias"):
                arr = getattr(st, key)
                self.register_buffer(f"x_{key}", torch.tensor(arr, dtype=dt, device=dev))
            self.flags = {k: bool(np.any(getattr(st, k))) for k in ("a", "s_out", "s_in", "bias")}

        def _context(self, x: Any) -> RouteContext:
            n = int(np.prod(x.shape[:-1]))
            b = int(x.shape[0]) if x.dim() == 3 else n
            ex = np.repeat(np.arange(b, dtype=np.int64), n // b)
            mask, tasks = self.state.get("attention_mask"), self.state.get("task_names")
            if mask is not None and x.dim() == 3 and mask.shape == tuple(x.shape[:2]):
                ex = np.where(mask.reshape(-1) > 0, ex, b)
                if tasks is not None:
                    tasks = [*tasks, tasks[0]]
            return RouteContext(example_index=ex, task_names=tasks, layer=self.name)

        def forward(self, x: Any) -> Any:
            y = self.base(x)
            x2 = x.reshape(-1, x.shape[-1])
            ctx = self._context(x)
            idx, w = self.router.select(x2.detach().to(torch.float64).cpu().numpy(), ctx)
            self.last = {"indices": idx, "weights": w, "examples": ctx.examples(x2.shape[0])}
            wt = torch.tensor(
                dense_weights(idx, w, len(self.experts)), dtype=x.dtype, device=x.device
            )
            return y + self._delta(x2, wt).reshape(y.shape)

        def _delta(self, x2: Any, wt: Any) -> Any:
            buf = {k: getattr(self, f"x_{k}") for k in ("a", "b", "s_out", "s_in", "bias")}
            return _mixed_delta(x2, wt, buf, self.flags, self.base, self.aggregation)

    return ExpertLinear


def _find_module(model: Any, module: str) -> tuple[Any, str, str]:
    """(parent module, attribute, full name) of ``module`` (also under ``base_model_prefix``)."""
    names = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "")
    for cand in (
        module,
        f"{prefix}.{module}" if prefix else module,
        module.removeprefix(f"{prefix}.") if prefix else module,
    ):
        if cand in names:
            parent, _, attr = cand.rpartition(".")
            return names[parent] if parent else model, attr, cand
    raise UserError(
        f"the model has no module {module!r}", hint="is this the experts' base?", module=module
    )


def _check_base(comp: Composition, open_base: Opener) -> None:
    cache: dict[str, str] = {}
    with open_base(comp.base) as base:
        for rec in comp.experts:
            bad = base_mismatches(read_patch(rec.patch_path).base, base, cache)
            if bad:
                raise mismatch_error(rec.ref, bad)


def _module_deltas(comp: Composition, n: int) -> dict[str, list[Pair]]:
    per = selected_deltas(comp)
    modules = sorted({module_of(t) for deltas in per for t in deltas})
    return {
        m: [(per[i].get(f"{m}.weight"), per[i].get(f"{m}.bias")) for i in range(n)] for m in modules
    }


def _renormalised(
    static: Mapping[str, float], kept: list[str], is_static: bool
) -> dict[str, float]:
    """Weights of the ``kept`` experts: static ones scaled to the old sum, else uniform."""
    if not is_static:
        return {n: 1.0 / len(kept) for n in kept}
    total, left = sum(static.values()), sum(static[n] for n in kept)
    scale = total / left if left else 0.0
    return {n: static[n] * scale for n in kept}


def _install(cm: Any, container: type[Any], linear: type[Any]) -> None:
    """(Re)place an expert container on every module the active experts adapt; restore the
    plain linear where none is left."""
    recs = [r for r in cm.comp.experts if r.name in cm.names]
    sub = Composition(cm.comp.root, cm.comp.lock, recs)
    settings = _settings(sub, cm.names, cm.static)
    modules = _module_deltas(sub, len(recs))
    for module in sorted(set(cm.containers) - set(modules)):
        parent, attr, _full = _find_module(cm.model, module)
        setattr(parent, attr, cm.containers.pop(module).base)
    for module, pairs in modules.items():
        existing = cm.containers.get(module)
        parent, attr, full = _find_module(cm.model, module)
        base = existing.base if existing is not None else getattr(parent, attr)
        if not isinstance(base, linear):
            raise UserError(
                f"module {full!r} is a {type(base).__name__}, not nn.Linear",
                hint="the runtime adapts Linear layers only",
                module=full,
            )
        bias = None if base.bias is None else base.bias.detach().cpu().numpy()
        stacks = _Stacks(base.out_features, base.in_features, bias, pairs)
        router = _router_for(sub, recs, f"{module}.weight", settings, cm.router_arrays)
        agg = str(cm.comp.lock["aggregation"])
        c = container(base, full, cm.names, stacks, router, agg, cm.state)
        setattr(parent, attr, c)
        cm.containers[module] = c


@functools.cache
def _model_class() -> type[Any]:
    from torch import nn

    class ComposedModel(nn.Module):  # type: ignore[misc]
        """A base model with routed experts: ``route_trace``, ``disable``, ``to_patch``."""

        def __init__(
            self,
            model: Any,
            comp: Composition,
            router_arrays: dict[str, np.ndarray],
        ) -> None:
            super().__init__()
            self.model, self.comp, self.router_arrays = model, comp, router_arrays
            self.state: dict[str, Any] = {}
            self.names = [rec.name for rec in comp.experts]
            self.static = default_weights(comp)
            self.containers: dict[str, Any] = {}
            self._build()

        def _build(self) -> None:
            _install(self, _container_class(), nn.Linear)

        def forward(self, *args: Any, task_names: Sequence[str] | None = None, **kw: Any) -> Any:
            mask = kw.get("attention_mask")
            self.state["attention_mask"] = None if mask is None else mask.detach().cpu().numpy()
            self.state["task_names"] = None if task_names is None else list(task_names)
            return self.model(*args, **kw)

        def route_trace(self) -> dict[str, dict[str, Any]]:
            """Per routed module: expert names, [T, k] indices and weights, token → example."""
            return {m: {"experts": list(c.experts), **c.last} for m, c in self.containers.items()}

        def disable(self, expert: str) -> None:
            """Remove ``expert`` everywhere; static weights are renormalised to the same sum."""
            if expert not in self.names:
                raise UserError(
                    f"no expert {expert!r} in the composition",
                    hint=f"experts: {', '.join(self.names)}",
                    expert=expert,
                )
            if len(self.names) == 1:
                raise UserError("cannot disable the last expert", hint="use the base model")
            self.names = [n for n in self.names if n != expert]
            is_static = self.comp.router["strategy"] == "static"
            self.static = _renormalised(self.static, self.names, is_static)
            self._build()

        def to_patch(
            self, out: str | os.PathLike[str], weights: Mapping[str, float] | None = None
        ) -> dict[str, Any]:
            """Export a fixed mixture (default: the current static/uniform weights) as a patch."""
            recs = [r for r in self.comp.experts if r.name in self.names]
            sub = Composition(self.comp.root, self.comp.lock, recs)
            return export_mixture(sub, out, dict(weights) if weights is not None else self.static)

    return ComposedModel


def _load_model(comp: Composition) -> Any:
    return load_model(comp.base, str(comp.lock.get("model_class", "AutoModel")))


def compose(
    source: str | os.PathLike[str] | Composition,
    *,
    model: Any = None,
    open_base: Opener = open_path,
) -> Any:
    """A ``ComposedModel`` (torch ``nn.Module``) for a manifest, a lockfile or a ``Composition``.

    ``model`` is a preloaded Hugging Face model of the base (else it is loaded from the base
    path). Every expert's pinned base tensors are checked first (mismatch → error naming it).
    """
    comp = (
        source if isinstance(source, Composition) else load_composition(source, open_base=open_base)
    )
    _check_base(comp, open_base)
    wf = comp.router_file()
    arrays = read_safetensors(Path(wf))[1] if wf is not None else {}
    base_model = model if model is not None else _load_model(comp)
    base_model.eval()
    return _model_class()(base_model, comp, arrays)


def expert_usage(composed: Any, n_examples: int) -> list[dict[str, float]]:
    """Per example: each expert's mean routing weight over the routed modules and its tokens."""
    totals = [dict.fromkeys(composed.names, 0.0) for _ in range(n_examples)]
    counts = [0] * n_examples
    for entry in composed.route_trace().values():
        if "indices" not in entry:
            continue
        dense = dense_weights(entry["indices"], entry["weights"], len(entry["experts"]))
        ex = entry["examples"]
        for i in range(n_examples):
            rows = dense[ex == i]
            if rows.size:
                counts[i] += 1
                for e, name in enumerate(entry["experts"]):
                    totals[i][name] += float(rows[:, e].mean())
    return [{n: v / max(c, 1) for n, v in t.items()} for t, c in zip(totals, counts, strict=True)]


# --------------------------------------------------------------------- PHATGOOSE gate training


@functools.cache
def _gated_class() -> type[Any]:
    import torch
    from torch import nn

    class GatedLinear(nn.Module):  # type: ignore[misc]
        """``base(x) + σ(⟨x, v⟩)·(B·A·x + Δb)``: one frozen LoRA expert behind a trainable gate."""

        def __init__(
            self, base: Any, a: np.ndarray, b: np.ndarray, bias: np.ndarray | None
        ) -> None:
            super().__init__()
            dt, dev = base.weight.dtype, base.weight.device
            self.base = base
            self.register_buffer("lora_a", torch.tensor(a, dtype=dt, device=dev))
            self.register_buffer("lora_b", torch.tensor(b, dtype=dt, device=dev))
            zero = np.zeros(base.out_features) if bias is None else bias
            self.register_buffer("bias_delta", torch.tensor(zero, dtype=dt, device=dev))
            self.gate = nn.Parameter(torch.zeros(base.in_features, dtype=dt, device=dev))

        def forward(self, x: Any) -> Any:
            g = torch.sigmoid(x @ self.gate)[..., None]
            a, b, d = (getattr(self, k) for k in ("lora_a", "lora_b", "bias_delta"))
            return self.base(x) + g * ((x @ a.T) @ b.T + d)

    return GatedLinear


def gate_expert(model: Any, record: ExpertRecord) -> dict[str, Any]:
    """Freeze ``model`` and wrap every linear the expert adapts in a gated copy of the expert.

    Returns {adapted weight name: its ``GatedLinear``}. Only LoRA experts (factors, optionally
    dense bias deltas) can be gated.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    deltas = expert_deltas(record.patch_path)
    cls, out = _gated_class(), {}
    for module in sorted({module_of(n) for n in deltas}):
        w, bias = deltas.get(f"{module}.weight"), deltas.get(f"{module}.bias")
        if w is None or w.kind != "factors" or w.a is None or w.b is None:
            raise UserError(
                f"expert {record.ref}: {module!r} has no LoRA factors; gates need LoRA experts",
                hint="train gates for low-rank experts only",
                expert=record.ref,
            )
        parent, attr, _full = _find_module(model, module)
        base = getattr(parent, attr)
        bd = None if bias is None else _bias_delta(bias, None)
        gated = cls(base, np.asarray(w.a, np.float64), np.asarray(w.b, np.float64), bd)
        setattr(parent, attr, gated)
        out[f"{module}.weight"] = gated
    return out


def train_gates(
    model: Any,
    record: ExpertRecord,
    batches: Sequence[Mapping[str, Any]],
    *,
    steps: int = 100,
    lr: float = 1e-2,
    optimizer: str = "adam",
) -> dict[str, np.ndarray]:
    """PHATGOOSE: train one sigmoid gate per adapted module with the base and expert frozen.

    ``batches`` are model keyword arguments including ``labels`` (the model must return a loss),
    used in order, cyclically, one per step. Gates start at zero (σ = ½ everywhere, as in the
    paper); dropout is off, so training is deterministic. ``optimizer`` is ``adam`` or ``sgd``.
    Returns {adapted weight name: gate [in]}.
    """
    import torch

    if not batches or steps < 1:
        raise UserError("train_gates needs at least one batch and one step", hint="add data")
    gated = gate_expert(model, record)
    params = [g.gate for g in gated.values()]
    opt_cls = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}.get(optimizer)
    if opt_cls is None:
        raise UserError(f"unknown optimizer {optimizer!r}", hint="use adam or sgd")
    opt = opt_cls(params, lr=lr)
    model.eval()  # no dropout: the same data give the same gates
    for step in range(steps):
        out = model(**batches[step % len(batches)])
        if getattr(out, "loss", None) is None:
            raise UserError("the model returned no loss", hint="pass labels in every batch")
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return {name: g.gate.detach().cpu().double().numpy() for name, g in gated.items()}


# ------------------------------------------------------------------------------ text helpers


def load_tokenizer(base: str) -> Any:
    """The base directory's Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


def load_model(base: str, model_class: str) -> Any:
    """``transformers.<model_class>.from_pretrained(base)`` (offline) in eval mode.

    A checkpoint that lacks weights the class needs (a ``…ForSequenceClassification`` head on a
    bare encoder) is refused: transformers would initialise them at random, so outputs and
    trained gates would differ from run to run.
    """
    model, missing = load_pretrained(model_class, base)
    if model is None:
        raise UserError(
            f"{base}: transformers' {model_class} does not fit its config.json",
            hint="choose a model class for this architecture (e.g. AutoModel)",
        )
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise UserError(
            f"{base}: the checkpoint has no {shown} for {model_class}: transformers would "
            "initialise them at random, so results would change from run to run",
            hint="use the checkpoint saved with that head (the fine-tuned classifier or LM), or "
            "a model class whose weights it holds (e.g. AutoModel)",
            model_class=model_class,
            missing=missing,
        )
    return model.eval()


def text_batches(
    tokenizer: Any, rows: Sequence[Mapping[str, Any]], batch_size: int
) -> list[dict[str, Any]]:
    """Tokenized batches of ``{"text", "label"}`` rows (without ``label``: causal-LM labels =
    the input ids, padding ignored)."""
    import torch

    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = dict(tokenizer([str(r["text"]) for r in chunk], return_tensors="pt", padding=True))
        if all("label" in r for r in chunk):
            enc["labels"] = torch.tensor([int(r["label"]) for r in chunk])
        else:
            enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(enc)
    return out


def run_texts(
    composed: Any, tokenizer: Any, texts: list[str], tasks: list[str] | None
) -> list[dict[str, Any]]:
    """One batch through ``composed``: per text its output and each expert's mean weight."""
    import torch

    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = composed(task_names=tasks, **enc)
    usage = expert_usage(composed, len(texts))
    logits = getattr(out, "logits", None)
    results = []
    for i, text in enumerate(texts):
        if logits is not None and logits.dim() == 2:
            value: Any = {"label": int(logits[i].argmax())}
        elif logits is not None:
            last = int(enc["attention_mask"][i].sum()) - 1
            value = {"next_token": tokenizer.decode([int(logits[i, last].argmax())])}
        else:
            hidden = out.last_hidden_state[i][enc["attention_mask"][i] > 0].mean(0)
            value = {"embedding_head": [round(float(v), 4) for v in hidden[:4]]}
        used = {k: round(v, 4) for k, v in usage[i].items()}
        results.append({"input": text, "output": value, "experts": used})
    return results
