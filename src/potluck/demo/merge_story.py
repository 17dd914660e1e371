"""The merge story: two branches change the model, partly the same tensors; ``git merge`` takes
one-sided changes exactly and TIES-merges the rest, and the merge commit says so."""

from __future__ import annotations

from typing import Any

import numpy as np

from potluck.demo.model import Params
from potluck.demo.shell import FILE, Log, Shell
from potluck.git.merge_record import TRAILER, MethodGroup
from potluck.merging import MERGE_METHODS

#: The demo repository's merge rule: tensors of layer 1 changed on both branches are TIES-merged.
MERGE_RULE: dict[str, Any] = {
    "path": "*.safetensors",
    "tensors": "h.1.*",
    "method": "ties",
    "params": {"density": 0.5},
    "seed": 0,
}
#: How each source is shown, in this order.
SOURCES = {
    "main": "changed on main only → taken from ours exactly",
    "branch": "changed on the branch only → from theirs exactly",
    "ties": "changed on both → TIES-merged",
    "unchanged": "unchanged on both sides",
}


def merge_sources(merged: Params, base: Params, main: Params, branch: Params) -> dict[str, str]:
    """Where each merged tensor came from, checked exactly: unchanged, main, branch, or TIES
    (equal to ``potluck.merging``'s TIES of both sides against the base, as the rule says)."""
    ties = MERGE_METHODS.get(MERGE_RULE["method"])
    out: dict[str, str] = {}
    for k, v in merged.items():
        if np.array_equal(main[k], branch[k]):
            out[k] = "unchanged" if np.array_equal(v, main[k]) else "WRONG"
        elif np.array_equal(branch[k], base[k]):
            out[k] = "main" if np.array_equal(v, main[k]) else "WRONG"
        elif np.array_equal(main[k], base[k]):
            out[k] = "branch" if np.array_equal(v, branch[k]) else "WRONG"
        else:
            want = ties.merge(
                [main[k], branch[k]],
                base[k],
                None,
                name=k,
                seed=MERGE_RULE["seed"],
                **MERGE_RULE["params"],
            ).astype(np.float32)
            out[k] = "ties" if np.array_equal(v, want) else "WRONG"
    return out


def expected_trailer(sources: dict[str, str]) -> str:
    """The ``Potluck-Merge`` value the merge commit must carry, from the verified sources: the
    rule's method with every parameter resolved (defaults included) and the counts."""
    method = MERGE_METHODS.get(MERGE_RULE["method"])
    params = method.resolve_params(MERGE_RULE["params"])
    n = {s: sum(1 for v in sources.values() if v == s) for s in SOURCES}
    label = MethodGroup(MERGE_RULE["method"], params, MERGE_RULE["seed"], []).label()
    return (
        f"{FILE}: {label} {n['ties']} tensors; "
        f"one-sided: {n['branch']} from theirs, {n['main']} from ours"
    )


def compact(names: list[str]) -> str:
    """``h.1.{attn.proj,ln_1}.weight, wte``: names of one layer with one suffix share braces."""
    groups: dict[tuple[str, str], list[str]] = {}
    for n in names:
        parts = n.split(".")
        key = (".".join(parts[:2]), parts[-1]) if len(parts) >= 4 else (n, "")
        groups.setdefault(key, []).append(".".join(parts[2:-1]) if len(parts) >= 4 else n)
    out = []
    for (prefix, suffix), mids in groups.items():
        if not suffix:
            out.append(prefix)
        elif len(mids) == 1:
            out.append(f"{prefix}.{mids[0]}.{suffix}")
        else:
            out.append(f"{prefix}.{{{','.join(mids)}}}.{suffix}")
    return ", ".join(out)


def report_merge(sh: Shell, sources: dict[str, str], log: Log) -> dict[str, object]:
    """Print which tensor came from where (verified) and the merge commit's trailer."""
    params = ", ".join(f"{k}={v}" for k, v in MERGE_RULE["params"].items())
    rule = f"{MERGE_RULE['method']}({params}, seed={MERGE_RULE['seed']})"
    both = f"{MERGE_RULE['tensors']} changed on both sides → {rule}"
    log(f"$ git merge embeddings   (.potluck.json: {both})")
    for src, what in SOURCES.items():
        names = sorted(k for k, v in sources.items() if v == src)
        shown = compact(names) if src != "unchanged" else ""
        what = what.replace("TIES-merged", "TIES-merged " + rule[4:])
        log(f"  {what:<56} {len(names):>2}  {shown}".rstrip())
    wrong = sorted(k for k, v in sources.items() if v == "WRONG")
    log("  verified tensor by tensor: one-sided ones equal that branch's bit for bit, merged ones")
    log(
        "  equal MERGE_METHODS['ties'].merge([main, branch], merge base) computed here: "
        f"{not wrong}" + (f" WRONG: {wrong}" if wrong else "")
    )
    message = sh("git", "log", "-1", "--format=%B").strip()
    parsed = sh("git", "log", "-1", f"--format=%(trailers:key={TRAILER},valueonly)").strip()
    want = expected_trailer(sources)
    log("$ git log -1 --format=%B   (the merge commit says how the weights were made)")
    for line in message.splitlines():
        log(f"  {line}")
    log(f"  trailer == the verified merge (method, all parameters, seed, counts): {parsed == want}")
    return {
        "merge_ok": not wrong,
        "merge_sources": sources,
        "merge_message": message,
        "merge_trailer": parsed,
        "trailer_ok": parsed == want,
    }
