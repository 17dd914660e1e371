"""Which modules a composition routes, and the lock-time check that the router has what it needs
there: an Arrow / PHATGOOSE artifact entry from every expert, or a learned router's weights.

The routed modules are those an expert adapts (any tensor ``<module>.weight`` / ``.bias``) whose
``<module>.weight`` one of ``router.layers``' globs matches; the runtime puts an expert container
on exactly these, and a fixed mixture (``compose export``) covers exactly their updates. Checking
at ``compose lock`` what ``compose run`` would need means a lock that is written can run.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from potluck.errors import FormatError, UserError
from potluck.ops.compose.library import ExpertRecord, load_artifact, read_safetensors

__all__ = [
    "NEEDS",
    "check_artifacts",
    "check_router_file",
    "module_of",
    "routed_weights",
    "selected",
]

#: Artifact each strategy needs from every expert at every routed module.
NEEDS = {"arrow": "arrow", "phatgoose": "phatgoose"}
#: How many names a message lists.
_SHOW = 4


def module_of(tensor: str) -> str:
    """``a.b.weight`` → ``a.b`` (the module a tensor belongs to)."""
    return tensor.rsplit(".", 1)[0]


def selected(tensors: Iterable[str], layers: Sequence[str]) -> list[str]:
    """The tensors of ``tensors`` whose module's ``.weight`` a ``layers`` glob matches."""
    globs = list(layers) or ["*"]
    return sorted(
        t for t in tensors if any(fnmatch.fnmatchcase(module_of(t) + ".weight", g) for g in globs)
    )


def routed_weights(per_expert: Iterable[Iterable[str]], layers: Sequence[str]) -> list[str]:
    """``<module>.weight`` of every routed module, given each expert's updated tensor names."""
    names = {t for tensors in per_expert for t in tensors}
    return sorted({module_of(t) + ".weight" for t in selected(names, layers)})


def _names(names: Sequence[str]) -> str:
    more = f" and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return ", ".join(repr(n) for n in names[:_SHOW]) + more


def check_artifacts(
    strategy: str, records: Sequence[ExpertRecord], routed: Sequence[str], manifest: Path
) -> None:
    """Every expert must have the strategy's artifact (fresh) with an entry for every routed
    module (``UserError`` naming the expert and the modules, and where all of them have one)."""
    kind = NEEDS.get(strategy)
    if kind is None:
        return
    tables = {rec.ref: set(load_artifact(rec, kind)) for rec in records}
    common = sorted(set.intersection(*tables.values())) if tables else []
    for rec in records:
        missing = [w for w in routed if w not in tables[rec.ref]]
        if missing:
            raise UserError(
                f"{manifest}: expert {rec.ref} has no {kind} artifact for {len(missing)} routed "
                f"module(s) ({_names(missing)}): the {strategy} router needs one from every "
                "expert at every module in router.layers",
                hint="narrow router.layers to modules every expert has one for"
                + (f" ({_names(common)})" if common else "")
                + "; modules outside router.layers get no expert update (run, export)",
                expert=rec.ref,
                tensors=missing,
            )


def check_router_file(
    path: Path, strategy: str, routed: Sequence[str], n_experts: int
) -> Mapping[str, np.ndarray]:
    """A learned / SMEAR router's weights file: it exists, is safetensors and has a
    ``<weight>/weight`` [E, d] for every routed module (``/bias`` [E] optional)."""
    if not path.is_file():
        raise UserError(
            f"router.weights_file {path} does not exist",
            hint=f"the {strategy} router reads its weights from it; fix the path",
            path=str(path),
        )
    _meta, arrays = read_safetensors(path)
    for weight in routed:
        w = arrays.get(f"{weight}/weight")
        if w is None or w.ndim != 2 or w.shape[0] != n_experts:
            got = "missing" if w is None else f"shape {list(w.shape)}"
            raise FormatError(
                f"{path}: the {strategy} router needs '{weight}/weight' of shape "
                f"[{n_experts}, d] for a routed module ({got})",
                hint="one [experts, in] matrix per routed module (and optionally '/bias' "
                "[experts]), or narrow router.layers",
                path=str(path),
                tensor=weight,
            )
    return arrays
