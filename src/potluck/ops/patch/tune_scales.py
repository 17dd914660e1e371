"""Scales of sign-coded tensors tuned on data: ComPEFT's α and BitDelta's scale distillation.

A sign codec (``codecs.sign``: ``ternary`` is ComPEFT, ``bitdelta`` is BitDelta) stores
Δ̂ = S_g · α_g per scale group g: fixed signs and a few scales. The codecs set α to the
weight-space least-squares value. Both papers tune it on data instead, by what the model outputs.
Here the objective is the mean squared difference between the patched model's outputs and
TARGET's on the ``--eval`` inputs (no labels needed):

* **ComPEFT** (Yadav et al. 2023) picks one multiplier of every tensor's scale from a grid by
  validation. Here the grid ``ALPHAS`` of multipliers of the ternary tensors' scales is scored
  by the objective, ×1 (the codec's scales) included.
* **BitDelta** (Liu et al. 2024, scale distillation) then trains the scales with the signs
  frozen, to bring the patched model's outputs to TARGET's. Here every sign-coded tensor's
  scales are trained as log-multipliers (a scale keeps its sign; steps are relative) with Adam
  (``LEARNING_RATE``) for ``steps`` steps, one eval batch a step, batches in order. The scales
  with the least loss on the whole eval set are kept, the starting ones included, so tuning
  never makes the eval loss worse.

The student is TARGET's model with every patched tensor replaced by what the patch rebuilds
(BASE + Δ̂), so the scales also make up for the other tensors' errors. Outputs are those of
``evaluate.head_output``: classifier logits, or mean-pooled logits or last hidden states.

Same inputs, thread count and machine give the same scales: nothing is sampled. Memory: TARGET's
model, the base and signs of the sign-coded tensors, and one batch's activations. torch and
transformers are imported inside functions (the ``stats`` extra).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from potluck.codecs import CODECS, Payload, SignScaledCodec, decode_payload
from potluck.errors import UserError
from potluck.fileio import file_sha256
from potluck.ops.models.sources import ModelSource
from potluck.ops.models.torchdata import load_batches
from potluck.ops.patch.evaluate import (
    check_eval_sizes,
    check_eval_target,
    head_output,
    load_model,
    pick_head,
    target_directory,
    torch_threads,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALPHAS",
    "LEARNING_RATE",
    "RECORD_RESERVE",
    "ScaleTuning",
    "TuneSettings",
    "param_names",
    "sign_coded",
    "tune_sign_scales",
    "tuning_bytes",
]

#: Multipliers of the ternary (ComPEFT) scales tried, ×1 first (kept on ties; its loss is
#: the starting one, not computed again).
ALPHAS = (1.0, 0.5, 0.75, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 10.0)
#: Adam's learning rate on the scales' log-multipliers.
LEARNING_RATE = 0.02
#: Header bytes a budgeted patch keeps for the tuning record (``ScaleTuning.record``).
RECORD_RESERVE = 1024
#: Header bytes a tuned tensor's re-measured error may add (its floats' text can grow).
PER_TENSOR_RESERVE = 64


@dataclass(frozen=True)
class TuneSettings:
    """How to tune: the ``--eval`` file and how much of it, steps and torch threads."""

    data: str
    steps: int = 100
    max_samples: int = 64
    batch_size: int = 8
    max_length: int = 512
    threads: int = 2

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise UserError(f"--distill-steps {self.steps}: must be 0 or more")
        check_eval_sizes(self.max_samples, self.batch_size, self.threads)


@dataclass(frozen=True)
class ScaleTuning:
    """What tuning did: tensors tuned and skipped, ComPEFT's α, the loss before and after."""

    tensors: list[str]
    skipped: list[str]
    alpha: float | None
    steps: int
    samples: int
    data_sha256: str
    loss_before: float
    loss_after: float
    seconds: float = field(compare=False, default=0.0)
    #: False when the tuned scales were not kept (the patch would have outgrown --budget)
    kept: bool = True

    def record(self) -> dict[str, Any]:
        """What the patch's description keeps (``scales_tuned``)."""
        return {
            "objective": "mean squared difference from TARGET's outputs on the eval inputs",
            "tensors": len(self.tensors),
            "compeft_alpha": self.alpha,
            "distill_steps": self.steps,
            "samples": self.samples,
            "data_sha256": self.data_sha256,
            "loss_before": float(f"{self.loss_before:.6g}"),
            "loss_after": float(f"{self.loss_after:.6g}"),
        }


def tuning_bytes(codecs: Iterable[str]) -> int:
    """Header bytes tuning may add to a patch whose tensors use ``codecs`` (by name): the
    record and each sign-coded tensor's re-measured error; 0 without a sign-coded tensor."""
    n = sum(isinstance(CODECS.get(c), SignScaledCodec) for c in codecs)
    return RECORD_RESERVE + PER_TENSOR_RESERVE * n if n else 0


def sign_coded(payloads: Mapping[str, Payload]) -> list[str]:
    """Names of the payloads whose codec stores signs and scales, sorted."""
    return sorted(
        n for n, p in payloads.items() if isinstance(CODECS.get(p.codec), SignScaledCodec)
    )


def param_names(
    model: Any, names: list[str], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, str]:
    """{checkpoint name: the model's parameter name} for the names the model has, with the same
    shape: the name itself, or with the model's ``base_model_prefix`` added or removed (as
    transformers loads a bare checkpoint into a model with a head, and back)."""
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    out: dict[str, str] = {}
    for name in names:
        tries = [name]
        if prefix:
            tries += [f"{prefix}.{name}", name.removeprefix(f"{prefix}.")]
        for t in tries:
            if params.get(t) == tuple(shapes[name]):
                out[name] = t
                break
    return out


@dataclass
class _Student:
    """TARGET's model with the patched tensors replaced, and the sign-coded ones as functions
    of trainable log-multipliers of their scales."""

    model: Any
    head: str
    params: dict[str, str]  # checkpoint name → parameter name, sign-coded tensors
    base: dict[str, torch.Tensor]
    signs: dict[str, torch.Tensor]
    scales: dict[str, torch.Tensor]  # the starting scales, float64
    logs: dict[str, torch.Tensor] = field(default_factory=dict)

    def weights(self, mult: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
        """The sign-coded parameters at the current log-multipliers (times ``mult``)."""
        import torch

        out = {}
        for name, pname in self.params.items():
            m = 1.0 if mult is None else mult.get(name, 1.0)
            scale = (self.scales[name] * m * torch.exp(self.logs[name])).to(self.base[name].dtype)
            delta = (self.signs[name] * scale[:, None]).reshape(self.base[name].shape)
            out[pname] = self.base[name] + delta
        return out

    def outputs(
        self, batch: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """[B, D] float64 outputs of one batch with ``weights`` in place of the parameters."""
        from torch.func import functional_call

        ids, mask = batch["input_ids"], batch["attention_mask"]
        out = functional_call(self.model, weights, (), {"input_ids": ids, "attention_mask": mask})
        return head_output(out, self.head, mask)

    def loss(
        self,
        batches: list[dict[str, torch.Tensor]],
        want: list[torch.Tensor],
        mult: Mapping[str, float] | None = None,
    ) -> float:
        """Mean squared output difference from TARGET's over every batch (no gradients)."""
        import torch

        with torch.no_grad():
            w = self.weights(mult)
            total = sum(
                float(((self.outputs(b, w) - t) ** 2).sum())
                for b, t in zip(batches, want, strict=True)
            )
        count = sum(int(t.numel()) for t in want)
        return total / max(count, 1)


def tune_sign_scales(
    base: ModelSource,
    target: ModelSource,
    payloads: Mapping[str, Payload],
    settings: TuneSettings,
    workdir: Path,
) -> tuple[dict[str, Payload], ScaleTuning | None]:
    """The sign-coded payloads with scales tuned on ``settings.data`` (module doc), and what
    was done; ``({}, None)`` when no payload is sign-coded. Other payloads are not returned."""
    names = sign_coded(payloads)
    if not names:
        return {}, None
    import torch

    t0 = time.perf_counter()
    cfg_dir = check_eval_target(target)
    head = pick_head(cfg_dir)
    batches, _labels = load_batches(
        settings.data, cfg_dir, settings.max_samples, settings.batch_size, settings.max_length
    )
    if not batches:
        raise UserError(f"{settings.data}: no examples to tune on", hint="check the --eval file")
    with (
        tempfile.TemporaryDirectory(prefix=".potluck-tune-", dir=workdir) as tmp,
        torch_threads(settings.threads),
    ):
        torch.manual_seed(0)
        model = load_model(target_directory(target, cfg_dir, Path(tmp)), head)
        model.eval()
        model.requires_grad_(False)
        with torch.no_grad():
            want = [head_output(model(**_inputs(b)), head, b["attention_mask"]) for b in batches]
        student = _student(model, head, base, payloads, names)
        before = student.loss(batches, want)
        alpha, start = _grid_alpha(student, batches, want, payloads, before)
        best = _distill(student, batches, want, settings.steps, start)
        student.logs = best.logs
        after = best.loss
        tuned = {n: _rescaled(student, n, payloads[n], best, base, target) for n in student.params}
    samples = sum(int(b["input_ids"].shape[0]) for b in batches)
    report = ScaleTuning(
        tensors=sorted(student.params),
        skipped=[n for n in names if n not in student.params],
        alpha=alpha,
        steps=settings.steps,
        samples=samples,
        data_sha256=file_sha256(settings.data),
        loss_before=before,
        loss_after=after,
        seconds=time.perf_counter() - t0,
    )
    return tuned, report


def _inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _student(
    model: Any, head: str, base: ModelSource, payloads: Mapping[str, Payload], names: list[str]
) -> _Student:
    """Put the patch's rebuilt tensors into ``model``; the sign-coded ones become trainable."""
    import torch

    have = set(base.names())
    shapes = {n: tuple(base.info(n).shape) for n in payloads if n in have}
    mapped = param_names(model, sorted(shapes), shapes)
    params = dict(model.named_parameters())
    st = _Student(model, head, {}, {}, {}, {})
    for name, pname in mapped.items():
        old = base.read(name)
        p = payloads[name]
        params[pname].data.copy_(_tensor(decode_payload(p, old), params[pname].dtype))
        codec = CODECS.get(p.codec)
        if name not in names or not isinstance(codec, SignScaledCodec):
            continue
        signs, scales = codec.sign_parts(p, old)
        dtype = params[pname].dtype
        st.params[name] = pname
        st.base[name] = _tensor(old, dtype)
        st.signs[name] = _tensor(signs, dtype)
        st.scales[name] = torch.from_numpy(scales.astype(np.float64))
        st.logs[name] = torch.zeros(scales.shape, dtype=torch.float64)
    return st


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``a`` as a torch tensor of ``dtype`` (numpy dtypes torch lacks, e.g. bfloat16, go
    through float32, which holds them exactly)."""
    import torch

    if a.dtype not in (np.float16, np.float32, np.float64):
        a = a.astype(np.float32)
    elif not a.flags.writeable:  # a read-only mapping of the file: torch wants its own copy
        a = a.copy()
    return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)


def _grid_alpha(
    student: _Student,
    batches: list[dict[str, torch.Tensor]],
    want: list[torch.Tensor],
    payloads: Mapping[str, Payload],
    start: float,
) -> tuple[float | None, float]:
    """ComPEFT's α, the multiplier of ``ALPHAS`` of the ternary scales with the least loss
    (``None`` without ternary tensors), and that loss; ``start`` is the loss at ×1."""
    ternary = [n for n in student.params if payloads[n].codec == "ternary"]
    if not ternary:
        return None, start
    best, best_loss = 1.0, start
    for a in ALPHAS[1:]:
        loss = student.loss(batches, want, dict.fromkeys(ternary, a))
        if loss < best_loss:
            best, best_loss = a, loss
    for n in ternary:
        student.scales[n] = student.scales[n] * best
    return best, best_loss


@dataclass
class _Best:
    loss: float
    logs: dict[str, torch.Tensor]


def _distill(
    student: _Student,
    batches: list[dict[str, torch.Tensor]],
    want: list[torch.Tensor],
    steps: int,
    start: float,
) -> _Best:
    """BitDelta's scale distillation: ``steps`` Adam steps on the log-multipliers; the best
    log-multipliers seen on the whole eval set (checked after every quarter of the steps and at
    the end), the starting ones (whose loss is ``start``) included."""
    import torch

    best = _Best(start, {n: t.clone() for n, t in student.logs.items()})
    if steps == 0 or not student.params:
        return best
    logs = list(student.logs.values())
    for t in logs:
        t.requires_grad_(True)
    opt = torch.optim.Adam(logs, lr=LEARNING_RATE)
    check_every = max(1, steps // 4)
    for step in range(steps):
        i = step % len(batches)
        opt.zero_grad()
        loss = ((student.outputs(batches[i], student.weights()) - want[i]) ** 2).mean()
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        if (step + 1) % check_every == 0 or step + 1 == steps:
            _keep_if_better(student, batches, want, best)
    for t in logs:
        t.requires_grad_(False)
    return best


def _keep_if_better(
    student: _Student, batches: list[dict[str, torch.Tensor]], want: list[torch.Tensor], best: _Best
) -> None:
    loss = student.loss(batches, want)
    if loss < best.loss:
        best.loss = loss
        best.logs = {n: t.detach().clone() for n, t in student.logs.items()}


def _rescaled(
    student: _Student,
    name: str,
    payload: Payload,
    best: _Best,
    base: ModelSource,
    target: ModelSource,
) -> Payload:
    """``payload`` with the best scales (the codec rewrites its own arrays and error)."""
    import torch

    codec = CODECS.get(payload.codec)
    assert isinstance(codec, SignScaledCodec)
    scales = (student.scales[name] * torch.exp(best.logs[name])).numpy()
    return codec.rescaled(payload, scales, target.read(name), base.read(name))
