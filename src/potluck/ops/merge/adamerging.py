"""Learning AdaMerging's layer-wise coefficients (``merging.adamerging``) before a merge.

``learn_adamerging(config, text)`` is a no-op for other methods and for configurations whose
models already carry their ``weight`` (a recorded run). Otherwise it checks everything it can
before loading anything (torch present, a base, one data file per model, each model a Hugging
Face directory whose config names a sequence classifier: AdaMerging needs each task's own head),
then loads each model as a classifier (a head the checkpoint lacks is refused: it would be
random), and runs Adam on λ [T, L] (one per task and merged tensor, starting at ``init``):

    loss = Σₜ mean entropy of softmax(headₜ(encoder_θ(λ)(xₜ))),  θ(λ)_ℓ = θ₀,ℓ + Σₛ λₛ,ℓ·τₛ,ℓ

with xₜ task t's unlabelled batches taken in file order (cycled), λ clamped to [0, 1] after each
step as in the authors' code. Only the encoder (the tensors under the model's
``base_model_prefix``) is merged with λ; each task keeps its own head in the forward pass. The
learned λ become per-model ``weight`` conditions (one ``{filter, value}`` per tensor, longest
names first, so no name matches another's filter; other tensors, the heads, get ``init``) and
are appended as JSON comments to the configuration text that ``potluck-merge.yaml`` records.

The optimisation itself is ``learn_layerwise``, which takes each task's forward as a function
of the merged tensors: a caller whose models are not Hugging Face classifiers (bench/quality's
mean-pooled sentence encoder with a linear head per task) learns λ with the same loop and
passes them to ``run_merge`` as ``weight`` conditions (``weight_conditions``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.ops.merge.config import MergeConfig, ModelInput
from potluck.ops.models.sources import open_path
from potluck.ops.models.torchdata import architectures, load_batches, load_pretrained, require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["Forward", "learn_adamerging", "learn_layerwise", "weight_conditions"]

_CLASSIFIER = "AutoModelForSequenceClassification"


def weight_conditions(coefficients: dict[str, float]) -> list[dict[str, Any]]:
    """``{filter: tensor, value: λ}`` per tensor, longest names first (see the module)."""
    order = sorted(coefficients, key=lambda n: (-len(n), n))
    return [{"filter": n, "value": float(coefficients[n])} for n in order]


def _settings(config: MergeConfig) -> dict[str, Any]:
    given = {k: v for k, v in config.parameters.items() if isinstance(v, (str, int, float, list))}
    return MERGE_METHODS.get("adamerging").resolve_params(given)


def _check(config: MergeConfig, p: dict[str, Any], models: list[ModelInput]) -> list[str]:
    """Everything checkable before loading: the data files (one per model) and the heads."""
    data = p["data"]
    files = list(data) if isinstance(data, tuple) else ([data] if data else [])
    if config.base_model is None or config.slices or len(files) != len(models):
        raise UserError(
            f"adamerging learns from each model's own unlabelled data: give one data file per "
            f"model ({len(models)}), got {len(files)}",
            hint="-p data=[a.jsonl,b.jsonl] (the forms of potluck stats), with --base",
            models=[m.model for m in models],
        )
    for m, f in zip(models, files, strict=True):
        if not Path(f).is_file():
            raise UserError(f"adamerging: data file {f!r} of {m.model!r} does not exist")
        if not any(a.endswith("ForSequenceClassification") for a in architectures(m.model)):
            raise UserError(
                f"adamerging needs each model's own classification head; {m.model!r} is not a "
                "model directory whose config.json names a ...ForSequenceClassification",
                hint="merge the fine-tuned classifiers (directories saved with save_pretrained)",
                model=m.model,
            )
    require_torch("merge method adamerging")
    return [str(f) for f in files]


def learn_adamerging(config: MergeConfig, text: str | None) -> tuple[MergeConfig, str | None]:
    """The configuration with learned per-model weights (see the module docstring)."""
    if config.merge_method != "adamerging":
        return config, text
    models = [m for m in config.models if m.model != config.base_model]
    if models and all("weight" in m.parameters for m in models):
        return config, text  # coefficients recorded by an earlier run
    p = _settings(config)
    files = _check(config, p, models)
    coefficients = _learn(config.base_model or "", [m.model for m in models], files, p)
    rest = {"value": float(p["init"])}  # tensors outside the encoder (the heads)
    learned = {
        m.model: [*weight_conditions(c), rest] for m, c in zip(models, coefficients, strict=True)
    }
    new_models = tuple(
        replace(m, parameters={**m.parameters, "weight": learned[m.model]})
        if m.model in learned
        else m
        for m in config.models
    )
    return replace(config, models=new_models), _record(text, learned)


def _record(text: str | None, learned: dict[str, list[dict[str, Any]]]) -> str | None:
    import json

    if text is None:
        return None
    lines = ["", "# adamerging: learned coefficients (weight per model and tensor)"]
    lines += [f"# {json.dumps({ref: conds})}" for ref, conds in learned.items()]
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


def _shared_names(base: str, refs: list[str]) -> list[str]:
    with open_path(base) as b:
        names = {n for n in b.names() if b.info(n).dtype in ("F32", "F16", "BF16", "F64")}
    for ref in refs:
        with open_path(ref) as m:
            names &= set(m.names())
    return sorted(names)


def _tensors(path: str, names: list[str]) -> dict[str, torch.Tensor]:
    import torch

    with open_path(path) as src:
        return {n: torch.from_numpy(np.array(src.read(n), dtype=np.float32)) for n in names}


def _learn(
    base: str, refs: list[str], files: list[str], p: dict[str, Any]
) -> list[dict[str, float]]:
    """λ per model and shared tensor, learned as the module docstring says."""
    heads = [_classifier(ref) for ref in refs]
    prefix = str(getattr(heads[0], "base_model_prefix", "")) + "."
    names = [n for n in _shared_names(base, refs) if n.startswith(prefix)]  # the encoder
    if not names:
        raise UserError(
            f"adamerging: the base and the models share no encoder tensors ({prefix}*)",
            hint="the base must be saved with the same model class as the fine-tunes",
        )
    theta0 = _tensors(base, names)
    taus = []
    for ref in refs:
        ft = _tensors(ref, names)
        taus.append({n: ft[n] - theta0[n] for n in names})
    batches = [
        [
            _unlabelled(b)
            for b in load_batches(
                f, ref, int(p["max_samples"]), int(p["batch_size"]), int(p["max_length"])
            )[0]
        ]
        for f, ref in zip(files, refs, strict=True)
    ]
    forwards = [_logits_of(model) for model in heads]
    out = learn_layerwise(
        theta0, taus, forwards, batches, steps=int(p["steps"]), lr=float(p["lr"]),
        init=float(p["init"]),
    )  # fmt: skip
    return [{n: float(out[t, i]) for i, n in enumerate(names)} for t in range(len(refs))]


Forward = Callable[[dict[str, "torch.Tensor"], dict[str, "torch.Tensor"]], "torch.Tensor"]
"""``forward(params, batch) -> logits [B, C]``: one task's prediction with the merged tensors."""


def learn_layerwise(
    theta0: Mapping[str, torch.Tensor],
    taus: Sequence[Mapping[str, torch.Tensor]],
    forwards: Sequence[Forward],
    batches: Sequence[Sequence[dict[str, torch.Tensor]]],
    *,
    steps: int,
    lr: float,
    init: float,
) -> np.ndarray:
    """AdaMerging's layer-wise coefficients λ [T, L] (L = the tensors of ``theta0``, in its
    order), learned on unlabelled batches.

    Adam on λ (starting at ``init``) minimises Σₜ mean entropy of softmax(``forwards[t]``(θ(λ),
    batch)), θ(λ)_ℓ = θ₀,ℓ + Σₛ λₛ,ℓ·τₛ,ℓ, with task t's batch ``step % len(batches[t])`` at each
    step; λ is clamped to [0, 1] after every step (the authors' code). ``forwards[t]`` is task
    t's model with its own head: the Hugging Face classifier of a ``potluck merge`` input, or any
    other model (e.g. a pooled sentence encoder and a linear head) a caller builds.
    """
    import torch

    if not (len(taus) == len(forwards) == len(batches)) or any(not b for b in batches):
        raise UserError(
            f"adamerging: {len(taus)} task vectors, {len(forwards)} models and "
            f"{len(batches)} data sets (each non-empty) must match"
        )
    names = list(theta0)
    torch.manual_seed(0)
    lam = torch.full((len(taus), len(names)), init, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    for step in range(steps):
        params = _merged(theta0, taus, names, lam)
        loss = sum(
            _entropy(fwd(params, b[step % len(b)]))
            for fwd, b in zip(forwards, batches, strict=True)
        )
        opt.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        with torch.no_grad():
            lam.clamp_(0.0, 1.0)
    out: np.ndarray = lam.detach().double().numpy()
    return out


def _classifier(ref: str) -> Any:
    model, missing = load_pretrained(_CLASSIFIER, ref)
    if model is None or missing:
        raise UserError(
            f"adamerging needs {ref!r}'s own classification head, but its checkpoint lacks "
            f"{', '.join(missing[:3]) or 'a classifier'}",
            hint="merge fine-tuned classifiers saved with their heads",
            model=ref,
        )
    model.eval()
    for q in model.parameters():
        q.requires_grad_(False)
    return model


def _merged(
    theta0: Mapping[str, torch.Tensor],
    taus: Sequence[Mapping[str, torch.Tensor]],
    names: list[str],
    lam: torch.Tensor,
) -> dict[str, torch.Tensor]:
    return {
        n: theta0[n] + sum(lam[t, i] * tau[n] for t, tau in enumerate(taus))  # type: ignore[misc]
        for i, n in enumerate(names)
    }


def _unlabelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits_of(model: Any) -> Forward:
    """The forward of a Hugging Face classifier under the merged tensors (others its own)."""
    import torch

    def forward(params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = torch.func.functional_call(model, params, args=(), kwargs=batch, strict=False)
        logits: torch.Tensor = out.logits
        return logits

    return forward


def _entropy(logits: torch.Tensor) -> Any:
    """Mean entropy of softmax(logits) over the batch, in float64 (``prediction_entropy``)."""
    import torch

    logp = torch.log_softmax(logits.double(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()
