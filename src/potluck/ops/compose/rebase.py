"""``experts rebase``: a low-rank expert of base v1 ported to base v2 as a new expert version.

The expert's patch is rebased with ``potluck.ops.patch.rebase.rebase_patch`` (three-way merge
relative to v1) and re-encoded low-rank at the expert's own rank, then added to the library as
``name@version`` pinned to v2 (tags, license and description carried over, evaluation values
not: they were measured on the old weights; Arrow prototypes recomputed when the old version had
them; PHATGOOSE gates are not carried: they were trained against v1). With task arithmetic a
LoRA update stays exactly the same update (v2 + (target − v1) − v2 = B·A), so the re-encoding is
exact up to rounding; other methods change it and the low-rank re-encoding reports its error.
(IA)³ experts cannot be rebased as (IA)³: the ported update is not a scaling of v2.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from potluck.errors import UserError
from potluck.ops.compose.library import (
    AddOptions,
    ExpertRecord,
    add_expert,
    expert_deltas,
    find_expert,
)
from potluck.ops.models.sources import ModelInput, open_input
from potluck.ops.patch.rebase import RebaseReport, rebase_patch

__all__ = ["rebase_expert"]


def _rank(record: ExpertRecord) -> int:
    deltas = expert_deltas(record.patch_path)
    if any(d.kind == "ia3" for d in deltas.values()):
        raise UserError(
            f"expert {record.ref} has (IA)³ updates: a rebased (IA)³ update is not a scaling of "
            "the new base, so it cannot stay an (IA)³ expert",
            hint="rebase the patch itself (`potluck patch rebase`) and use it as a plain patch",
            expert=record.ref,
        )
    ranks = [int(d.a.shape[0]) for d in deltas.values() if d.kind == "factors" and d.a is not None]
    return max(ranks, default=1)


def rebase_expert(
    library: str | os.PathLike[str],
    ref: str,
    old_base: ModelInput,
    new_base: ModelInput,
    version: str,
    *,
    method: str = "task_arithmetic",
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[ExpertRecord, RebaseReport]:
    """Add ``ref``'s expert rebased from ``old_base`` onto ``new_base`` as ``name@version``
    (see the module docstring); returns the new record and the rebase report."""
    record = find_expert(library, ref)
    rank = _rank(record)
    meta = record.meta
    options = AddOptions(
        tags=list(meta.get("tags") or []),
        license=meta.get("license"),
        description=meta.get("description"),
        arrow="arrow" in (meta.get("artifacts") or {}),
    )
    with ExitStack() as stack:
        new = open_input(new_base, stack)
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="potluck-rebase-")))
        patch = tmp / "expert.patch"
        report = rebase_patch(
            record.patch_path, old_base, new, patch, method=method, params=params, seed=seed,
            codec="lowrank", codec_params={"rank": rank},
        )  # fmt: skip
        added = add_expert(library, patch, record.name, version, base=new, options=options)
    return added, report
