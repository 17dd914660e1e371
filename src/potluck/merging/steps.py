"""The papers' steps as pure functions on float arrays (no I/O, randomness passed in).

Task vectors (Ilharco et al., https://arxiv.org/abs/2212.04089), TIES' trim → elect sign →
disjoint mean (Yadav et al., https://arxiv.org/abs/2306.01708), DARE's drop and rescale (Yu et al.,
https://arxiv.org/abs/2311.03099), Model Breadcrumbs' two-tailed mask (Davari & Belilovsky,
https://arxiv.org/abs/2312.06795) and DELLA's MagPrune keep probabilities (Deep et al.,
https://arxiv.org/abs/2406.11617). Arrays of shape ``(k, *shape)`` hold one row per model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from potluck.errors import UserError

#: Rescaling after a drop: divide by the keep probability (DARE/DELLA papers), match the L1 norm
#: of the unpruned vector (mergekit ≥ 0.1), or nothing.
RESCALE_MODES = ("inverse", "l1", "none")
#: Sign election: sign of the summed (weighted) values (TIES paper, mergekit "sum"), or the sign
#: held by most entries (mergekit "count").
CONSENSUS_METHODS = ("sum", "count")


def task_vectors(models: np.ndarray, base: np.ndarray) -> np.ndarray:
    """τᵢ = θᵢ − θ_base for every model row."""
    return np.asarray(models - base[np.newaxis])


def keep_count(density: float, size: int) -> int:
    """How many of ``size`` entries a ``density`` keeps: floor, robust to float error, and at
    least one (as mergekit's ``max(1, …)``: a small tensor such as a norm is never emptied).

    (0.29 · 100 keeps 29; a bare ``int()``, as in mergekit, would keep 28.)
    """
    return max(1, min(size, int(density * size + 1e-9))) if size else 0


@dataclass(frozen=True)
class TrimCut:
    """Where TIES' trim cuts one task vector: keep every entry with ``|τ| > threshold``, and the
    first ``at_threshold`` entries (in flat order) with ``|τ| == threshold``, so exactly k stay."""

    threshold: float
    at_threshold: int


def trim_cut(tau: np.ndarray, density: float, *, name: str = "") -> TrimCut | None:
    """The cut keeping the ``density`` fraction of largest magnitudes (None: keep everything).

    Top-k by selection (``np.partition``, no sort), on a float64 copy of ``|τ|``.
    """
    if density >= 1 or tau.size == 0:
        return None
    mags = np.abs(np.asarray(tau, dtype=np.float64).reshape(-1))  # a fresh array
    return magnitude_cut(mags, density, name=name)


def magnitude_cut(mags: np.ndarray, density: float, *, name: str = "") -> TrimCut:
    """``trim_cut`` given ``|τ|`` as a flat float64 array, which it reorders in place."""
    size = mags.size
    k = keep_count(density, size)
    kth = size - k
    mags.partition(kth)
    threshold = float(mags[kth])
    above = int(np.count_nonzero(mags[kth + 1 :] > threshold))
    return TrimCut(threshold, k - above)


#: ``streamed_cut`` gathers the values of a histogram bin once it holds at most this many.
_GATHER_AT_MOST = 1 << 16


def streamed_cut(
    blocks: Callable[[], Iterator[np.ndarray]], size: int, density: float, *, name: str = ""
) -> TrimCut:
    """``magnitude_cut`` of the concatenation of the blocks ``blocks()`` yields (flat,
    contiguous float64 ``|τ|``, in flat order; ``blocks`` is called again for each pass), holding
    one block and a 65536-bin histogram at a time: the same ``TrimCut``, bit for bit.

    Non-negative float64 values order as their bit patterns read as unsigned integers, so the
    k-th largest is found digit by digit (16 bits a pass, from the top), until the bin that
    holds it is small enough to gather and select in: usually two passes over the data.
    """
    if size <= 0:
        raise ValueError("streamed_cut needs at least one value")
    k = keep_count(density, size)
    prefix, shift, above = 0, 64, 0  # ``above``: values known to be larger than the cut
    while shift > 0:
        shift -= 16
        counts = np.zeros(1 << 16, dtype=np.int64)
        for bits in _patterns(blocks, prefix, shift + 16):
            counts += np.bincount((bits >> np.uint64(shift)) & np.uint64(0xFFFF), minlength=1 << 16)
        from_top = np.cumsum(counts[::-1])
        j = int(np.searchsorted(from_top, k - above))  # first digit (from the top) reaching k
        digit = (1 << 16) - 1 - j
        above += int(from_top[j] - counts[digit])
        prefix = (prefix << 16) | digit
        if shift and counts[digit] <= _GATHER_AT_MOST:
            gathered = np.concatenate([*_patterns(blocks, prefix, shift), np.zeros(0, np.uint64)])
            need = k - above
            gathered.partition(gathered.size - need)
            cut = gathered[gathered.size - need]
            above += int(np.count_nonzero(gathered > cut))
            return TrimCut(float(cut.view(np.float64)), k - above)
    return TrimCut(float(np.uint64(prefix).view(np.float64)), k - above)


def _patterns(
    blocks: Callable[[], Iterator[np.ndarray]], prefix: int, shift: int
) -> Iterator[np.ndarray]:
    """The bit patterns (uint64) of each block's values whose top ``64 - shift`` bits are
    ``prefix`` (all of them when ``shift`` is 64)."""
    for block in blocks():
        bits = np.ascontiguousarray(block, dtype=np.float64).reshape(-1).view(np.uint64)
        if shift < 64:
            bits = bits[(bits >> np.uint64(shift)) == np.uint64(prefix)]
        yield bits


def apply_cut(tau: np.ndarray, cut: TrimCut | None, used: int = 0) -> tuple[np.ndarray, int]:
    """``tau`` (a whole task vector, or a block of one after ``used`` entries at the threshold
    were kept earlier) with the entries outside the cut zeroed; and the new ``used`` count."""
    if cut is None:
        return tau.copy(), used
    mags = np.abs(tau)
    keep = mags > cut.threshold
    room = cut.at_threshold - used
    if room > 0:
        ties = np.flatnonzero(mags == cut.threshold)[:room]
        keep.reshape(-1)[ties] = True
        used += len(ties)
    return np.where(keep, tau, 0.0), used


def trim(tau: np.ndarray, density: float, *, name: str = "") -> np.ndarray:
    """TIES step 1: keep the ``density`` fraction of largest magnitudes of one task vector.

    Exactly ``keep_count`` entries stay; among equal magnitudes at the cut, the first in flat
    order (see ``TrimCut``), so a tensor trimmed in row blocks gives the same result.
    density ≥ 1 returns a copy.
    """
    return apply_cut(tau, trim_cut(tau, density, name=name))[0]


def trim_outliers(tau: np.ndarray, density: float, gamma: float, *, name: str = "") -> np.ndarray:
    """Model Breadcrumbs' mask (mergekit ``magnitude_outliers``): drop the ``gamma`` fraction of
    largest magnitudes, then the smallest, so that ``density`` remains.

    If density + gamma > 1, fewer large entries are dropped to reach the density. density ≥ 1
    returns a copy (gamma is then unused, as in mergekit); as in mergekit 0.1.5, when ``n_top``
    rounds to 0 the top entries are kept.
    """
    size = tau.size
    if density >= 1 or size == 0:
        return tau.copy()
    target = keep_count(density, size)
    n_top = min(int(gamma * size + 1e-9), size - target)
    n_bot = size - target - n_top
    flat = tau.ravel()
    kth = [x for x in (n_bot, size - n_top) if x < size]
    order = np.argpartition(np.abs(flat), kth)
    keep = order[n_bot : size - n_top]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(tau.shape)


def random_keep_mask(
    gen: np.random.Generator, keep_prob: float | np.ndarray, shape: tuple[int, ...]
) -> np.ndarray:
    """DARE's drop: each entry kept independently with probability ``keep_prob`` (bool mask)."""
    return gen.random(shape) < keep_prob


def magprune_keep_probs(
    tau: np.ndarray, density: float, epsilon: float, scope: str = "row"
) -> np.ndarray:
    """DELLA's MagPrune: keep probabilities rising linearly with magnitude rank.

    Ranks (ascending magnitude, ties by position) are normalised to [0, 1] and mapped to
    [density − ε, density + ε]: the smallest entry gets density − ε, the largest density + ε.
    ``scope="row"`` ranks within each row (first axis vs the rest, as mergekit does for matrices);
    ``"tensor"`` ranks the whole tensor. A single entry gets ``density``.
    """
    rows = tau.shape[0] if scope == "row" and tau.ndim >= 2 else 1
    if tau.size == 0:
        return np.zeros(tau.shape, dtype=np.float64)
    mags = np.abs(tau).reshape(rows, -1)
    n = mags.shape[1]
    if n <= 1:
        return np.full(tau.shape, density, dtype=np.float64)
    order = np.argsort(mags, axis=1, kind="stable")
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.arange(n)[np.newaxis].repeat(rows, axis=0), axis=1)
    probs = (density - epsilon) + (ranks / (n - 1)) * (2 * epsilon)
    return np.asarray(probs.reshape(tau.shape))


def rescale(
    masked: np.ndarray, tau: np.ndarray, keep_prob: float | np.ndarray, mode: str
) -> np.ndarray:
    """Undo the shrinkage of a drop (see ``RESCALE_MODES``).

    ``"inverse"`` divides by the keep probability, so E[result] = τ; ``"l1"`` scales the kept
    entries so that ‖result‖₁ = ‖τ‖₁ (skipped, as in mergekit, when either norm is below 1e-7).
    """
    if mode == "inverse":
        return masked / keep_prob
    if mode == "l1":
        before, after = float(np.abs(tau).sum()), float(np.abs(masked).sum())
        if before < 1e-7 or after < 1e-7:
            return masked
        return masked * (before / after)
    if mode == "none":
        return masked
    raise ValueError(f"unknown rescale mode {mode!r}")


def elect_sign(weighted: np.ndarray, method: str = "sum") -> np.ndarray:
    """TIES step 2: the elected sign (+1/−1) per entry; a tie (0) elects +1, as in mergekit.

    ``"sum"``: sign of Σᵢ wᵢτᵢ (the paper's total magnitude); ``"count"``: sign of Σᵢ sign(wᵢτᵢ).
    """
    if method == "sum":
        total = weighted.sum(axis=0)
    elif method == "count":
        total = np.sign(weighted).sum(axis=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    return np.where(total >= 0, 1.0, -1.0)


def disjoint_mean(
    weighted: np.ndarray, weights: np.ndarray, sign: np.ndarray, *, normalize: bool = True
) -> np.ndarray:
    """TIES step 3: combine only the entries whose sign agrees with the elected one.

    Sum of agreeing wᵢτᵢ, divided (``normalize``) by the sum of the agreeing models' weights, as in
    mergekit; where that sum is 0 the sum is left undivided, as in mergekit (where no entry
    agrees, the result is 0).
    """
    # |agreeing entries| = max(wᵢτᵢ · sign, 0); multiplying by ±1 is exact, so the sum equals
    # the sum of the agreeing wᵢτᵢ bit for bit, with fewer passes over memory
    aligned = weighted * sign[np.newaxis]
    np.maximum(aligned, 0.0, out=aligned)
    total = aligned.sum(axis=0)
    total *= sign
    if not normalize:
        return np.asarray(total)
    divisor = np.zeros(sign.shape, dtype=total.dtype)
    for i, w in enumerate(weights):
        np.add(divisor, w, out=divisor, where=aligned[i] > 0)
    divisor[divisor == 0] = 1.0
    total /= divisor
    return np.asarray(total)


def weighted_sum(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σᵢ wᵢ·valuesᵢ over the first axis."""
    return np.tensordot(weights, values, axes=1)


def weight_total(weights: np.ndarray, *, method: str, name: str) -> float:
    """Σ wᵢ for normalising; a sum within 1e-8 of zero is an error (mergekit would divide by 1)."""
    total = float(weights.sum())
    if abs(total) < 1e-8:
        raise UserError(
            f"merge method {method!r}: weights {weights.tolist()} sum to zero, so they cannot be "
            f"normalised (tensor {name!r})",
            hint="change the weights, or pass normalize=False",
            method=method,
            tensor=name,
            weights=weights.tolist(),
        )
    return total
