"""Rebase a patch onto a new version of its base: ``rebase_patch(P, OLD, NEW, OUT)``.

A patch P made against base v1 (OLD; checked against the sha256s P pins) is ported to v2 (NEW)
as a three-way merge relative to v1, tensor by tensor:

* P changed the tensor and v2 did not: the patch's tensor, exactly (``patch``);
* v2 changed it and P did not: v2's tensor, so the new patch does not touch it (``base``);
* both changed it (a *conflict*): the merge method combines the two task vectors
  ``v2 − v1`` and ``target − v1`` relative to v1 (``task_arithmetic``: v2 + (target − v1);
  ``ties``: trim, elect sign, disjoint mean), cast to v2's dtype;
* P added a tensor: the patch's (a conflict when v2 added one of that name too); P removed a
  tensor: removed again.

The result is written as a new patch of v2 (``create_patch`` with the given codec, exact by
default), pinned to v2's tensors, whose description records the rebase (old patch, both base
digests, method, parameters, conflicts): the lineage edge, carried by the patch file itself.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from potluck.codecs import decode_payload, payload_shape_dtype
from potluck.codecs.rules import Rule
from potluck.errors import IntegrityError, UserError
from potluck.fileio import file_sha256
from potluck.merging import MERGE_METHODS
from potluck.ops.lineage import Edge, Parent, tensor_hashes
from potluck.ops.lineage.digest import TensorHashes
from potluck.ops.models.sources import ModelInput, ModelSource, TensorInfo, open_input
from potluck.ops.patch.create import PatchInfo, create_patch
from potluck.ops.patch.fileformat import PatchContents, read_patch
from potluck.tensors.digests import weights_digest

__all__ = ["METHOD_ALIASES", "RebaseReport", "TensorRebase", "rebase_patch"]

#: Short names accepted for ``method`` (``ta`` = task arithmetic).
METHOD_ALIASES = {"ta": "task_arithmetic"}


@dataclass(frozen=True)
class TensorRebase:
    """One tensor of the patch: ``status`` ``patch`` / ``conflict`` / ``added`` / ``removed``,
    how it was resolved, and the relative size of each side's change (‖Δ‖ / ‖v1‖)."""

    name: str
    status: str
    resolution: str
    base_change: float | None = None
    patch_change: float | None = None


@dataclass
class RebaseReport:
    """What ``rebase_patch`` wrote and decided."""

    out_path: str
    method: str
    params: dict[str, Any]
    old_base_digest: str
    new_base_digest: str
    tensors: list[TensorRebase] = field(default_factory=list)
    base_only: int = 0
    patch: PatchInfo | None = None
    edge: Edge | None = None

    @property
    def conflicts(self) -> list[TensorRebase]:
        """The tensors both the base and the patch changed."""
        return [t for t in self.tensors if t.status == "conflict"]


def _method(name: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    full = METHOD_ALIASES.get(name, name)
    method = MERGE_METHODS.get(full)
    if not method.needs_base:
        raise UserError(
            f"merge method {full!r} does not merge relative to a base; a rebase needs one",
            hint="use task_arithmetic (ta), ties, dare_ties, … (see `potluck merge --list`)",
            method=full,
        )
    return full, method.resolve_params(params)


def _target(name: str, patch: PatchContents, old: ModelSource) -> np.ndarray:
    payload = patch.payloads[name]
    base = None if payload.codec == "full" or name not in patch.base else old.read(name)
    return decode_payload(payload, base)


def _rel(delta: np.ndarray, ref: np.ndarray) -> float:
    norm = float(np.linalg.norm(ref))
    return float(np.linalg.norm(delta)) / norm if norm else float(np.linalg.norm(delta))


class _Rebased:
    """The rebased model as a lazy ``ModelSource`` over v2 (what ``create_patch`` diffs)."""

    def __init__(
        self, patch: PatchContents, old: ModelSource, new: ModelSource, unchanged: set[str]
    ) -> None:
        self.patch, self.old, self.new = patch, old, new
        self.unchanged = unchanged  # tensors v1 and v2 hold with the same bytes
        self.decisions: dict[str, TensorRebase] = {}

    def source(self, method: str, params: dict[str, Any], seed: int) -> ModelSource:
        infos = {n: i for n, i in self.new.infos.items() if n not in set(self.patch.removed)}
        for name in sorted(self.patch.payloads):
            if name not in infos:
                shape, dtype = payload_shape_dtype(self.patch.payloads[name])
                infos[name] = TensorInfo(name, dtype, shape)

        def read(name: str) -> np.ndarray:
            if name in self.patch.payloads:
                return self.tensor(name, method, params, seed)
            return self.new.read(name)

        return ModelSource(f"{self.new.label} (rebased)", infos, read)

    def tensor(self, name: str, method: str, params: dict[str, Any], seed: int) -> np.ndarray:
        target = _target(name, self.patch, self.old)
        if name not in self.patch.base:  # the patch adds it
            both = name in self.new.infos
            status, how = ("conflict", "the patch's tensor") if both else ("added", "added")
            self.decisions[name] = TensorRebase(name, status, how)
            return target
        v1, v2 = self.old.read(name), self.new.read(name)
        if v1.shape != v2.shape or v1.dtype != v2.dtype or target.shape != v1.shape:
            raise UserError(
                f"tensor {name!r} changed shape or dtype between the bases or in the patch "
                f"({v1.dtype}{list(v1.shape)} → {v2.dtype}{list(v2.shape)}); no three-way merge",
                hint="re-create the patch against the new base",
                tensor=name,
            )
        d_base = v2.astype(np.float64) - v1
        d_patch = target.astype(np.float64) - v1
        if name in self.unchanged:
            self.decisions[name] = TensorRebase(name, "patch", "the patch's tensor", 0.0,
                                                _rel(d_patch, v1))  # fmt: skip
            return target
        merged = MERGE_METHODS.get(method).merge([v2, target], v1, None, name=name, seed=seed,
                                                 **params)  # fmt: skip
        self.decisions[name] = TensorRebase(name, "conflict", f"{method} of both changes",
                                            _rel(d_base, v1), _rel(d_patch, v1))  # fmt: skip
        return np.asarray(merged).astype(v2.dtype)


def _check_old(old: TensorHashes, patch: PatchContents) -> None:
    bad = [n for n, want in sorted(patch.base.items()) if n not in old or old[n][2] != want]
    if bad:
        raise IntegrityError(
            f"the old base is not the one the patch was made against: {len(bad)} tensor(s) "
            f"differ from the patch's pinned hashes, e.g. {bad[0]!r}",
            hint="pass the base the patch was created from (--old-base, or a revision of it)",
            tensors=bad[:20],
        )


def _check_new(new: ModelSource, patch: PatchContents) -> None:
    missing = sorted(n for n in patch.base if n not in new.infos)
    if missing:
        raise UserError(
            f"the new base has no tensor {missing[0]!r}, which the patch changes",
            hint="the new base must be a version of the same model (same tensor names)",
            tensors=missing[:20],
        )


def rebase_patch(
    patch_path: str | os.PathLike[str],
    old_base: ModelInput,
    new_base: ModelInput,
    out_path: str | os.PathLike[str],
    *,
    method: str = "task_arithmetic",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
    codec: str = "exact_xor",
    codec_params: Mapping[str, object] | None = None,
    rules: tuple[Rule, ...] = (),
) -> RebaseReport:
    """Port the patch at ``patch_path`` from ``old_base`` (v1) to ``new_base`` (v2) and write the
    new patch to ``out_path`` (see the module docstring). ``method`` is a merge method that works
    relative to a base (``ta`` = ``task_arithmetic``, ``ties``, …) with ``params`` and ``seed``;
    ``codec`` / ``codec_params`` / ``rules`` encode the new patch (exact by default)."""
    full, resolved = _method(method, params or {})
    patch = read_patch(patch_path)
    with ExitStack() as stack:
        old = open_input(old_base, stack)
        new = open_input(new_base, stack)
        h_old = tensor_hashes(old)
        _check_old(h_old, patch)
        _check_new(new, patch)
        h_new = tensor_hashes(new)
        d_old, d_new = weights_digest(h_old), weights_digest(h_new)
        unchanged = {n for n, h in h_new.items() if h_old.get(n) == h}
        rebased = _Rebased(patch, old, new, unchanged)
        sha = file_sha256(patch_path)
        report = RebaseReport(str(out_path), full, resolved, d_old, d_new)
        description = dict(patch.description)
        description["rebased"] = {"from_patch_sha256": sha, "old_base_digest": d_old,
                                  "new_base_digest": d_new, "method": full,
                                  "params": _json_params(resolved), "seed": seed}  # fmt: skip
        info = create_patch(
            new, rebased.source(full, resolved, seed), out_path, rules=rules,
            default_codec=codec, params=codec_params, seed=seed, description=description,
        )  # fmt: skip
    report.patch = info
    report.tensors = [rebased.decisions[n] for n in sorted(rebased.decisions)]
    report.tensors += [TensorRebase(n, "removed", "removed") for n in sorted(patch.removed)]
    report.base_only = len(set(h_new) - unchanged - set(patch.payloads))
    report.edge = Edge(file_sha256(out_path), (Parent(None, d_new), Parent(None, d_old)),
                       "patch", "rebase", {"method": full, "params": _json_params(resolved),
                       "seed": seed, "from_patch_sha256": sha,
                       "conflicts": [t.name for t in report.conflicts]},
                       path=str(out_path), refs=("new base", "old base"))  # fmt: skip
    return report


def _json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
