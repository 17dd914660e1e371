"""Patches at a size budget: choose each tensor's codec by a rate–distortion allocation.

For every changed float matrix, its singular spectrum (``merging.svd.top_k_svd``) gives the
predicted error of each candidate encoding at each rank r:

* ``lowrank`` with float16 factors: 2·r·(m + n) bytes, squared error Σ_{i≥r} σᵢ² (Eckart–Young)
  plus float16 rounding (σᵢ²·2·(2⁻¹¹)²/3 per kept direction);
* ``qlowrank`` with int8 or int4 factors: ``qlowrank.factor_bytes``, squared error the tail
  plus ``qlowrank.predicted_sq_error`` per kept direction;
* ``full`` (exact): the tensor's bytes, error 0; ``qlowrank`` rank 0: 0 bytes, error ‖Δ‖.

Each tensor's options are reduced to the lower convex hull of (bytes, squared error). The
allocation starts every tensor at its cheapest option (with ``max_error``: its cheapest option
whose predicted relative error is within the tolerance) and then repeatedly takes the hull step
with the largest error reduction per byte that still fits the budget (ties by tensor name) —
the Lagrangian optimum of Σ‖Δ̂ₜ − Δₜ‖²_F (the whole delta's squared Frobenius error) on the
hull, up to the last step. The result depends only on the inputs (deterministic).

Tensors without a choice — 1-D, non-float, reshaped, non-finite, and added ones — are stored
exactly (``full``) and count as fixed cost, with an estimate of the file's header per tensor.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from potluck.codecs.base import stable_key
from potluck.codecs.qlowrank import factor_bytes, predicted_sq_error
from potluck.errors import UserError
from potluck.merging.svd import top_k_svd
from potluck.ops.models.sources import ModelSource
from potluck.ops.patch.budget_sign import sign_options
from potluck.ops.patch.fileformat import PatchContents, patch_bytes
from potluck.ops.patch.weights import InputWeight, StatsLookup, input_weight

__all__ = [
    "Choice",
    "Option",
    "Plan",
    "TensorCurve",
    "allocate",
    "check_fits",
    "exact_curve",
    "header_estimate",
    "matrix_curve",
    "parse_budget",
    "patch_size",
    "plan_patch",
    "refill",
    "tensor_curve",
]

#: Header bytes of a patch file besides its tensors (metadata keys, digests, description).
FIXED_HEADER = 1536
#: Header bytes per stored tensor, plus ``PER_NAME`` per character of its name (its codec meta
#: and error, base and result hashes, as escaped JSON) …
PER_TENSOR = 600
PER_NAME = 3
#: … plus, per payload array, ``PER_ARRAY`` and the name again (dtype, shape, offsets); an
#: option's array entries count in its bytes. ``check_fits`` measures the real header before
#: writing.
PER_ARRAY = 100

_F16_REL = 2 * (2.0**-11) ** 2 / 3
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: codec, parameters, payload bytes, predicted squared error and
    the allocation's loss (the squared error, or with statistics its effect on the outputs:
    ``ops.patch.weights``; NaN means the squared error)."""

    codec: str
    params: Mapping[str, object]
    nbytes: int
    sq_error: float
    loss: float = math.nan

    def __post_init__(self) -> None:
        if math.isnan(self.loss):
            object.__setattr__(self, "loss", self.sq_error)


@dataclass(frozen=True)
class TensorCurve:
    """A tensor's candidate encodings: the lower convex hull, cheapest first."""

    name: str
    norm_sq: float
    fp16_bytes: int
    options: list[Option]
    weighted: bool = False


@dataclass(frozen=True)
class Choice:
    """The allocation's pick for one tensor, with its predicted relative error."""

    codec: str
    params: Mapping[str, object]
    nbytes: int
    predicted_error: float


@dataclass
class Plan:
    """Per-tensor choices, the bytes they take and the budget they were fitted to."""

    choices: dict[str, Choice] = field(default_factory=dict)
    payload_bytes: int = 0
    header_bytes: int = 0
    budget: int | None = None
    fp16_delta_bytes: int = 0
    #: the allocation's state (each tensor's hull and the index of its pick), kept for ``refill``
    curves: dict[str, TensorCurve] = field(default_factory=dict, repr=False)
    at: dict[str, int] = field(default_factory=dict, repr=False)

    def rule(self, name: str) -> list[tuple[str, str, Mapping[str, object]]]:
        """The one codec rule that encodes ``name`` as planned (an fnmatch-escaped pattern)."""
        c = self.choices[name]
        return [(re.sub(r"([\[\]*?])", r"[\1]", name), c.codec, dict(c.params))]


def parse_budget(text: str | int, fp16_delta_bytes: int) -> int:
    """Bytes from ``--budget``: an int, ``5MB``/``5MiB`` (decimal/binary units) or ``x16``
    (1/16 of the changed tensors' size as a float16 delta)."""
    s = str(text).strip().lower().replace(" ", "")
    hint = "write bytes (1000000), a size (5MB, 512KiB) or a fraction of the fp16 delta (x16)"
    if s.startswith("x"):
        try:
            ratio = float(s[1:])
        except ValueError:
            raise UserError(f"bad --budget {text!r}", hint=hint) from None
        if not ratio > 0 or not math.isfinite(ratio):
            raise UserError(f"bad --budget {text!r}: the ratio must be positive", hint=hint)
        return int(fp16_delta_bytes / ratio)
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]+)?)([a-z]*)", s)
    if m is None or m.group(2) not in _UNITS:
        raise UserError(f"bad --budget {text!r}", hint=hint)
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def header_estimate(names: Sequence[str]) -> int:
    """An upper estimate of a patch file's non-payload bytes for tensors ``names``."""
    return FIXED_HEADER + sum(PER_TENSOR + PER_NAME * len(n) for n in names)


def array_cost(name: str, count: int) -> int:
    """Header bytes of ``count`` payload arrays of tensor ``name``."""
    return count * (PER_ARRAY + len(name))


def exact_curve(name: str, nbytes: int, fp16_bytes: int) -> TensorCurve:
    """A tensor that is stored exactly (``full``): one option, error 0."""
    return TensorCurve(
        name, 0.0, fp16_bytes, [Option("full", {}, nbytes + array_cost(name, 1), 0.0)]
    )


def matrix_curve(
    name: str,
    delta: np.ndarray,
    seed: int,
    full_bytes: int,
    weight: InputWeight | None = None,
) -> TensorCurve:
    """The hull of a float delta's candidate encodings (``delta`` of ndim ≥ 2, finite).

    When some rows of Δ are zero, the factored options cover only the changed rows
    (``rows="changed"``, 4 bytes of index per row). With ``weight`` (the inputs' Gram matrix)
    each option's loss is its predicted effect on the layer's outputs (``ops.patch.weights``)."""
    whole = delta.reshape(delta.shape[0], -1)
    a = whole
    fp16 = 2 * int(np.count_nonzero(a))
    changed = np.flatnonzero(np.any(a != 0, axis=1))
    extra: dict[str, object] = {}
    index_bytes = 0
    w = weight
    if changed.size < a.shape[0]:
        a, extra, index_bytes = a[changed], {"rows": "changed"}, 4 * int(changed.size)
        w = None if weight is None else weight.restrict_rows(changed)
    m, n = a.shape
    norm_sq = float(np.sum(a.astype(np.float64) ** 2))
    rng = np.random.Generator(np.random.Philox(key=stable_key(seed, name, "budget")))
    u, s, vt = top_k_svd(a, min(m, n), rng=rng)
    s2 = s**2
    tail = np.maximum(norm_sq - np.concatenate([[0.0], np.cumsum(s2)]), 0.0)
    wt = _Weighting.of(w, a, u, s2, vt, tail)
    u_max, v_max = np.abs(u).max(axis=0), np.abs(vt).max(axis=1)
    rows_arr = 1 if extra else 0
    index_bytes += array_cost(name, rows_arr)
    options = [wt.option("qlowrank", {"rank": 0, "bits": 4}, array_cost(name, 4), 0, 0.0)]
    if full_bytes > 0:
        options.append(Option("full", {}, full_bytes + array_cost(name, 1), 0.0, 0.0))
    f16 = np.concatenate([[0.0], np.cumsum(s2 * _F16_REL)])
    for bits in (8, 4):
        q = np.concatenate([[0.0], np.cumsum(predicted_sq_error(s, u_max, v_max, m, n, bits))])
        for r in range(1, s.size + 1):
            nb = factor_bytes(r, m, n, bits) + index_bytes + array_cost(name, 4)
            params = {"rank": r, "bits": bits, **extra}
            options.append(wt.option("qlowrank", params, nb, r, q[r]))
    q4 = predicted_sq_error(s, u_max, v_max, m, n, 4)
    q8 = predicted_sq_error(s, u_max, v_max, m, n, 8)
    mixed = _mixed_options(tail, q4, q8, m, n, index_bytes + array_cost(name, 8), extra)
    for o in mixed:
        r = int(str(o.params["rank"]))
        options.append(wt.option(o.codec, o.params, o.nbytes, r, o.sq_error - tail[r]))
    for r in range(1, s.size + 1):
        params = {"rank": r, "factors": "F16", **extra}
        nb = 2 * r * (m + n) + index_bytes + array_cost(name, 2)
        options.append(wt.option("lowrank", params, nb, r, f16[r]))
    if delta.ndim == 2 and not extra:  # sign codecs store every row: not for row-sparse Δ
        options += [Option(*o) for o in sign_options(name, whole, weight, norm_sq)]
    return TensorCurve(name, norm_sq, fp16, lower_hull(options), weighted=weight is not None)


@dataclass(frozen=True)
class _Weighting:
    """Squared error and loss of a rank-r option: the truncation tail plus rounding noise."""

    tail: np.ndarray
    wtail: np.ndarray
    noise_weight: float

    @staticmethod
    def of(
        w: InputWeight | None,
        a: np.ndarray,
        u: np.ndarray,
        s2: np.ndarray,
        vt: np.ndarray,
        tail: np.ndarray,
    ) -> _Weighting:
        """Weighted tails Σ_{i≥r} σᵢ² gᵢ from the whole weighted error (``weights``)."""
        if w is None:
            return _Weighting(tail, tail, 1.0)
        total = w.error(a)
        cum = np.concatenate([[0.0], np.cumsum(s2 * w.direction_weights(u, vt))])
        return _Weighting(tail, np.maximum(total - cum, 0.0), w.mean_diag)

    def option(
        self, codec: str, params: Mapping[str, object], nbytes: int, rank: int, noise: float
    ) -> Option:
        """The option keeping ``rank`` directions with squared rounding error ``noise``."""
        sq = float(self.tail[rank] + noise)
        return Option(
            codec, params, nbytes, sq, float(self.wtail[rank] + noise * self.noise_weight)
        )


def _mixed_options(
    tail: np.ndarray,
    q4: np.ndarray,
    q8: np.ndarray,
    m: int,
    n: int,
    index_bytes: int,
    extra: Mapping[str, object],
) -> list[Option]:
    """``qlowrank`` with ``high`` = h leading directions int8 and r − h int4, for every
    0 < h < r, reduced to the Pareto-optimal ones (less error for more bytes) in numpy."""
    k = q4.size
    h, r = np.arange(k + 1)[:, None], np.arange(k + 1)[None, :]
    c4, c8 = np.concatenate([[0.0], np.cumsum(q4)]), np.concatenate([[0.0], np.cumsum(q8)])
    err = tail[r] + c8[h] + c4[r] - c4[h]
    low = r - h
    nb = h * (m + n + 8) + (low * m + 1) // 2 + (low * n + 1) // 2 + 8 * low + index_bytes
    ok = (h > 0) & (h < r)
    hs, rs = np.broadcast_to(h, ok.shape)[ok], np.broadcast_to(r, ok.shape)[ok]
    nbs, errs = nb[ok], err[ok]
    order = np.lexsort((errs, nbs))
    best = np.minimum.accumulate(errs[order])
    keep = order[np.concatenate([[True], errs[order][1:] < best[:-1]])] if order.size else order
    return [
        Option(
            "qlowrank",
            {"rank": int(rs[i]), "bits": 4, "high": int(hs[i]), **extra},
            int(nbs[i]),
            float(errs[i]),
        )
        for i in keep
    ]


def lower_hull(options: Sequence[Option]) -> list[Option]:
    """The options on the lower convex hull of (bytes, loss), cheapest first, each
    strictly better than the one before (ties broken by codec and parameters, so the result
    does not depend on the input order)."""
    pts = sorted(options, key=lambda o: (o.nbytes, o.loss, o.codec, repr(sorted(o.params.items()))))
    hull: list[Option] = []
    for p in pts:
        if hull and p.loss >= hull[-1].loss:
            continue
        while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
            hull.pop()
        hull.append(p)
    return hull


def _cross(a: Option, b: Option, c: Option) -> float:
    """> 0 when b lies strictly below the segment a → c."""
    return (b.nbytes - a.nbytes) * (c.loss - a.loss) - (b.loss - a.loss) * (c.nbytes - a.nbytes)


def _rel(curve: TensorCurve, opt: Option) -> float:
    return math.sqrt(opt.sq_error / curve.norm_sq) if curve.norm_sq > 0 else 0.0


def _start(curve: TensorCurve, max_error: float | None) -> int:
    """Index of the cheapest hull option within ``max_error`` (the exact end always is)."""
    if max_error is None:
        return 0
    for i, opt in enumerate(curve.options):
        if _rel(curve, opt) <= max_error:
            return i
    return len(curve.options) - 1


def allocate(
    curves: Sequence[TensorCurve],
    budget: int | None,
    max_error: float | None,
    reserve: int = 0,
) -> Plan:
    """Choose an option per tensor (module docstring); ``budget`` in bytes of the whole file,
    ``reserve`` of them kept for header entries written later (counted as fixed overhead).

    A budget below the smallest feasible patch is a ``UserError`` naming that size."""
    ordered = sorted(curves, key=lambda c: c.name)
    at = {c.name: _start(c, max_error) for c in ordered}
    header = header_estimate([c.name for c in ordered]) + reserve
    used = header + sum(c.options[at[c.name]].nbytes for c in ordered)
    if budget is not None and used > budget:
        raise _too_small(budget, used, header, max_error)
    if budget is not None:
        used = _greedy(ordered, at, budget - used) + used
    plan = Plan(budget=budget, header_bytes=header, curves={c.name: c for c in ordered}, at=at)
    plan.fp16_delta_bytes = sum(c.fp16_bytes for c in ordered)
    for c in ordered:
        _choose(plan, c)
    plan.payload_bytes = used - header
    return plan


def _choose(plan: Plan, c: TensorCurve) -> None:
    opt = c.options[plan.at[c.name]]
    plan.choices[c.name] = Choice(opt.codec, opt.params, opt.nbytes, _rel(c, opt))


def refill(plan: Plan, room: int) -> list[str]:
    """Spend ``room`` more bytes as ``allocate`` spends the budget (the next hull steps by error
    reduction per byte) and return the tensors whose choice changed, by name. ``create_patch``
    calls it with what the real header left of the budget (``header_estimate`` is an upper
    bound, so a plan never overshoots but leaves bytes unspent)."""
    before = dict(plan.at)
    plan.payload_bytes += _greedy(list(plan.curves.values()), plan.at, room)
    changed = sorted(name for name, i in plan.at.items() if i != before[name])
    for name in changed:
        _choose(plan, plan.curves[name])
    return changed


def patch_size(contents: PatchContents) -> int:
    """The size of the file ``contents`` would be written as (header and payload arrays)."""
    return _header_size(contents) + _array_bytes(contents)


def _header_size(contents: PatchContents) -> int:
    return len(next(iter(patch_bytes(contents))))


def _array_bytes(contents: PatchContents) -> int:
    return sum(int(a.nbytes) for p in contents.payloads.values() for a in p.arrays.values())


def _greedy(curves: Sequence[TensorCurve], at: dict[str, int], room: int) -> int:
    """Take hull steps by error reduction per byte while they fit ``room``; the bytes spent."""
    by_name = {c.name: c for c in curves}
    heap: list[tuple[float, str]] = []

    def push(c: TensorCurve) -> None:
        i = at[c.name]
        if i + 1 < len(c.options):
            a, b = c.options[i], c.options[i + 1]
            gain = (a.loss - b.loss) / max(b.nbytes - a.nbytes, 1)
            heapq.heappush(heap, (-gain, c.name))

    for c in curves:
        push(c)
    spent = 0
    while heap:
        _gain, name = heapq.heappop(heap)
        c = by_name[name]
        i = at[name]
        step = c.options[i + 1].nbytes - c.options[i].nbytes
        if spent + step > room:
            continue  # this tensor's next step does not fit; its later ones are dearer still
        spent += step
        at[name] = i + 1
        push(c)
    return spent


def _too_small(budget: int, needed: int, header: int, max_error: float | None) -> UserError:
    what = (
        f"no encoding meets --max-error {max_error:g} within it"
        if max_error is not None
        else "it is smaller than the patch's fixed overhead (header and exactly-stored tensors)"
    )
    return UserError(
        f"--budget {budget} bytes is too small: {what}; the smallest feasible budget is "
        f"{needed} bytes",
        hint=f"pass --budget {needed} or more"
        + ("" if max_error is None else ", or raise --max-error"),
        budget=budget,
        smallest_budget=needed,
        header_bytes=header,
    )


def tensor_curve(
    name: str,
    old: np.ndarray,
    new: np.ndarray,
    seed: int,
    stats: StatsLookup | None = None,
) -> TensorCurve:
    """The candidate encodings of one changed tensor (exact only where no codec choice applies:
    reshaped, non-float, 1-D or non-finite deltas); ``stats``: Gram statistics by name."""
    fp16 = 2 * int(new.size)
    if old.shape != new.shape or old.dtype != new.dtype or new.ndim < 2 or new.size == 0:
        return exact_curve(name, int(new.nbytes), fp16)
    if new.dtype.kind != "f" or new.dtype.itemsize < 2:
        return exact_curve(name, int(new.nbytes), fp16)
    ct = np.float64 if new.dtype == np.float64 else np.float32
    delta = new.astype(ct) - old.astype(ct)
    if not np.all(np.isfinite(delta)):
        return exact_curve(name, int(new.nbytes), fp16)
    shape = (delta.shape[0], int(delta.size // max(delta.shape[0], 1)))
    weight = None if stats is None else input_weight(name, stats(name), shape)
    return matrix_curve(name, delta, seed, int(new.nbytes), weight)


def rescale_unweighted(curves: Sequence[TensorCurve]) -> list[TensorCurve]:
    """With statistics for some tensors only, the others' losses (squared weight errors) are
    put on the outputs' scale: times the median, over the weighted tensors, of (loss of
    dropping the whole delta) / ‖Δ‖²."""
    ratios = [
        c.options[0].loss / c.norm_sq
        for c in curves
        if c.weighted and c.norm_sq > 0 and c.options[0].sq_error == c.norm_sq
    ]
    if not ratios:
        return list(curves)
    k = float(np.median(ratios))
    return [
        c
        if c.weighted
        else dataclasses.replace(
            c, options=[dataclasses.replace(o, loss=o.sq_error * k) for o in c.options]
        )
        for c in curves
    ]


def plan_patch(
    base: ModelSource,
    target: ModelSource,
    common: Sequence[str],
    added: Sequence[str],
    *,
    budget: str | int | None,
    max_error: float | None,
    seed: int,
    stats: StatsLookup | None = None,
) -> Plan:
    """Read each tensor pair once, build its curve, and allocate (``allocate``); unchanged
    tensors are left out, added ones stored whole. Memory: one tensor pair and its SVD.
    ``stats`` (Gram statistics by tensor name) weights each error by its effect on outputs."""
    if max_error is not None and not (0 <= max_error < math.inf):
        raise UserError(f"bad --max-error {max_error}", hint="a relative error, e.g. 0.05 for 5 %")
    curves = []
    for name in common:
        old, new = base.read(name), target.read(name)
        same = old.dtype == new.dtype and old.shape == new.shape
        if same and base.sha256(name, old) == target.sha256(name, new):
            continue
        curves.append(tensor_curve(name, old, new, seed, stats))
    for name in added:
        new = target.read(name)
        curves.append(exact_curve(name, int(new.nbytes), 2 * int(new.size)))
    if stats is not None:
        curves = rescale_unweighted(curves)
    fp16 = sum(c.fp16_bytes for c in curves)
    limit = None if budget is None else parse_budget(budget, fp16)
    return allocate(curves, limit, max_error)


def check_fits(plan: Plan, contents: PatchContents) -> None:
    """Refuse, before anything is written, a patch whose real size (header included) exceeds
    the plan's budget (the header estimate was too low); the error names the size it needs."""
    if plan.budget is None:
        return
    header = _header_size(contents)
    size = header + _array_bytes(contents)
    if size > plan.budget:
        raise UserError(
            f"--budget {plan.budget} bytes is too small for the patch potluck planned: its "
            f"header took {header} bytes, {header - plan.header_bytes} more than estimated; "
            f"the patch needs {size} bytes",
            hint=f"pass --budget {size} or more",
            budget=plan.budget,
            smallest_budget=size,
        )
