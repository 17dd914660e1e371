"""Per-task parts of a merge: ``OUT/tasks/<name>.patch`` for ``tall_masks`` and ``emr``.

Such a merge writes the merged model θ_m as any merge does, then one patch per input model
(``<name>``: the input's file stem or directory name) whose tensors use the ``task_mask`` codec
(``codecs.mask``): a bit-packed mask and a rescaler over the merged task vector θ_m − θ₀. Each
patch pins θ_m by tensor hash (the patch's base, checked by ``patch apply`` as for every patch),
θ₀ by tensor hash (payload meta ``origin``) and by weights digest (description ``origin``, with
the base's path, absolute and relative to ``OUT``, so ``patch apply`` finds it), and records the
hash of every rebuilt tensor.

Masks are computed from the merged tensors as stored (after the cast to the output dtype), so a
task's model is rebuilt from exactly what is on disk. EMR's rescaler is one number per task over
the whole model (the paper's), so its sums take one extra pass over the tensors first. The packed
masks of all tasks stay in memory until the patches are written: 1/8 byte per parameter and task.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import Payload
from potluck.codecs.base import error_report
from potluck.codecs.mask import mask_payload, masked_task_vector
from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.merging.base import model_value
from potluck.merging.emr import emr_mask, emr_rescaler, masked_sums
from potluck.merging.masks import tall_mask
from potluck.ops.merge.config import MergeConfig
from potluck.ops.merge.plan import MergePlan, TensorJob
from potluck.ops.models.sources import ModelSource, open_path
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256, weights_digest

__all__ = ["TASK_PART_METHODS", "TaskParts", "plan_task_parts", "task_name", "task_notes"]

#: Methods whose merges write a patch per input model.
TASK_PART_METHODS = ("tall_masks", "emr")
#: Suffixes dropped from a checkpoint file's name to name its task.
_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz", ".gguf")


def task_name(ref: str) -> str:
    """The task name of a model reference: its file stem or directory name (``@rev`` dropped)."""
    path = ref if "@" not in ref or Path(ref).exists() else ref.rsplit("@", 1)[0]
    name = Path(path.rstrip("/\\")).name
    for suffix in _SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class TaskParts:
    """What ``plan_task_parts`` decided: the method and each input model's task name."""

    method: str
    base_ref: str
    names: dict[str, str]
    written: dict[str, dict[str, Any]] = field(default_factory=dict)

    def write(self, out_dir: str | os.PathLike[str], plan: MergePlan, sources: Opened) -> None:
        """Write ``out_dir/tasks/<name>.patch`` for every input; on failure remove ``out_dir``
        (just written by the merge), so a failed merge leaves nothing behind."""
        try:
            with open_path(out_dir) as merged:
                self._write(Path(out_dir), plan, merged, sources)
        except BaseException:
            shutil.rmtree(out_dir, ignore_errors=True)
            raise

    def _write(self, out: Path, plan: MergePlan, merged: ModelSource, sources: Opened) -> None:
        jobs = [j for j in plan.jobs if _masked_job(j)]
        scales = _emr_scales(jobs, merged, sources) if self.method == "emr" else {}
        builders = {ref: _PatchBuilder(name, self.method) for ref, name in self.names.items()}
        for job in jobs:
            _add_tensor(job, merged, sources, builders, scales)
        (out / "tasks").mkdir(exist_ok=True)
        origin = self._origin(out)
        for ref, b in builders.items():
            path = out / "tasks" / f"{b.name}.patch"
            size = write_patch(path, b.contents(ref, origin))
            self.written[b.name] = b.summary(str(path), size)

    def _origin(self, out: Path) -> dict[str, Any]:
        ref = self.base_ref
        p = Path(ref if "@" not in ref or Path(ref).exists() else ref.rsplit("@", 1)[0])
        found = p.exists()
        return {
            "ref": self.base_ref,
            "path": str(p.resolve()) if found else None,
            "relpath": os.path.relpath(p.resolve(), out.resolve()) if found else None,
        }


Opened = Mapping[str, ModelSource]


def _masked_job(job: TensorJob) -> bool:
    return job.method in TASK_PART_METHODS and job.base is not None and not job.carried


def plan_task_parts(config: MergeConfig, plan: MergePlan) -> TaskParts | None:
    """The task parts a merge will write (None for other methods), checked before merging:
    input names must be distinct and the configuration must not use slices."""
    method = plan.method.name
    if method not in TASK_PART_METHODS:
        return None
    if config.slices or config.base_model is None:
        raise UserError(
            f"merge method {method!r} writes one patch per input model, which needs a base "
            "model and a models: list (no slices:)",
            hint="list the fine-tunes under models: and name base_model",
            method=method,
        )
    names: dict[str, str] = {}
    for m in config.models:
        if m.model == config.base_model:
            continue
        names[m.model] = _checked_name(m.model, names)
    return TaskParts(method, config.base_model, names)


def task_notes(parts: TaskParts | None) -> list[str]:
    """One line per written task patch: its path, size and bits per parameter."""
    if parts is None:
        return []
    return [
        f"tasks/{name}.patch: {w['bytes']} bytes, {w['bits_per_parameter']:.4g} bits/parameter "
        f"over {w['parameters']} parameters (mask {w['mask_bits_per_parameter']:.4g})"
        for name, w in sorted(parts.written.items())
    ]


def _checked_name(ref: str, names: Mapping[str, str]) -> str:
    name = task_name(ref)
    clash = [r for r, n in names.items() if n == name]
    if clash:
        raise UserError(
            f"models {clash[0]!r} and {ref!r} would both write tasks/{name}.patch",
            hint="give the inputs distinct file or directory names",
            models=[clash[0], ref],
        )
    if not name or name.startswith("."):
        raise UserError(
            f"model {ref!r} has no usable task name ({name!r})",
            hint="give the input a file or directory name that does not start with a dot",
            model=ref,
        )
    return name


def _compute(arr: np.ndarray) -> np.ndarray:
    return arr.astype(np.float64 if arr.dtype == np.float64 else np.float32)


def _emr_scales(jobs: list[TensorJob], merged: ModelSource, sources: Opened) -> dict[str, float]:
    """EMR step 3 over the whole model: γₜ per input model reference."""
    sums: dict[str, list[float]] = {}
    for job in jobs:
        assert job.base is not None
        origin = _compute(sources[job.base[0]].read(job.base[1]))
        tau_m = _compute(merged.read(job.out.name)) - origin
        for ref, tensor in job.models:
            tau_t = _compute(sources[ref].read(tensor)) - origin
            num, den = masked_sums(tau_t, tau_m, emr_mask(tau_t, tau_m))
            acc = sums.setdefault(ref, [0.0, 0.0])
            acc[0] += num
            acc[1] += den
    return {ref: emr_rescaler(num, den) for ref, (num, den) in sums.items()}


def _add_tensor(
    job: TensorJob,
    merged: ModelSource,
    sources: Opened,
    builders: Mapping[str, _PatchBuilder],
    scales: Mapping[str, float],
) -> None:
    """One merged tensor's payload in every task's patch."""
    assert job.base is not None
    origin_raw = sources[job.base[0]].read(job.base[1])
    merged_raw = merged.read(job.out.name)
    origin = _compute(origin_raw)
    tau_m = _compute(merged_raw) - origin
    params = MERGE_METHODS.get(job.method).resolve_params(job.params)
    for i, (ref, tensor) in enumerate(job.models):
        builder = builders.get(ref)
        if builder is None:
            continue
        target = sources[ref].read(tensor)
        tau_t = _compute(target) - origin
        if job.method == "emr":
            mask, scale = emr_mask(tau_t, tau_m), scales[ref]
        else:
            mask, scale = tall_mask(tau_t, tau_m, model_value(params, "mask_lambda", i)), 1.0
        rebuilt = masked_task_vector(mask, scale, merged_raw, origin_raw)
        kept = float(mask.mean()) if mask.size else 1.0
        error = error_report(tau_t, _compute(rebuilt) - origin, kept)
        payload = mask_payload(mask, scale, origin_raw, method=job.method, error=error)
        builder.add(job.out.name, payload, merged_raw, origin_raw, rebuilt)


class _PatchBuilder:
    """One task's patch, tensor by tensor."""

    def __init__(self, name: str, method: str) -> None:
        self.name, self.method = name, method
        self.payloads: dict[str, Payload] = {}
        self.base: dict[str, str] = {}
        self.result: dict[str, str] = {}
        self.origin: dict[str, tuple[str, list[int], str]] = {}
        self.params = 0
        self.mask_bytes = 0

    def add(
        self,
        name: str,
        payload: Payload,
        merged: np.ndarray,
        origin: np.ndarray,
        rebuilt: np.ndarray,
    ) -> None:
        self.payloads[name] = payload
        self.base[name] = tensor_sha256(merged)
        self.result[name] = tensor_sha256(rebuilt)
        dtype = str(payload.meta["dtype"])
        self.origin[name] = (dtype, list(origin.shape), str(payload.meta["origin"]))
        self.params += int(origin.size)
        self.mask_bytes += int(payload.arrays["mask"].nbytes)

    def contents(self, ref: str, origin: Mapping[str, Any]) -> PatchContents:
        description = {
            "task": self.name,
            "task_model": ref,
            "merge_method": self.method,
            "origin": {**origin, "weights_digest": weights_digest(self.origin)},
            "parameters": self.params,
            "mask_bits_per_parameter": self.mask_bits(),
        }
        return PatchContents(
            payloads=self.payloads, base=self.base, result=self.result, description=description
        )

    def mask_bits(self) -> float:
        return 8.0 * self.mask_bytes / self.params if self.params else 0.0

    def summary(self, path: str, size: int) -> dict[str, Any]:
        bits = 8.0 * size / self.params if self.params else 0.0
        return {
            "path": path,
            "bytes": size,
            "parameters": self.params,
            "bits_per_parameter": round(bits, 4),
            "mask_bits_per_parameter": round(self.mask_bits(), 4),
        }
