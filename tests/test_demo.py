"""The demo runs end to end and its numbers hold."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from potluck.demo import FILE, MERGE_RULE, run_demo
from potluck.merging import MERGE_METHODS


def _ties_label() -> str:
    """``ties(k=v, …, seed=0)`` with every TIES parameter (defaults filled in), sorted."""
    params = MERGE_METHODS.get("ties").resolve_params({"density": 0.5})
    args = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    return f"ties({', '.join(sorted(args))}, seed=0)"


def _check_merge_provenance(res: dict, text: str) -> None:
    assert res["merge_ok"] is True and res["trailer_ok"] is True
    assert MERGE_RULE["params"] == {"density": 0.5} and MERGE_RULE["seed"] == 0
    want = f"{FILE}: {_ties_label()} 6 tensors; one-sided: 2 from theirs, 4 from ours"
    assert "density=0.5, " in want and "lambda_=1.0, " in want
    assert res["merge_trailer"] == want
    msg = subprocess.run(
        ["git", "log", "-1", "--format=%B"], cwd=res["root"], capture_output=True, check=True
    ).stdout
    parsed = subprocess.run(
        ["git", "interpret-trailers", "--parse"], input=msg, capture_output=True, check=True
    ).stdout.decode()
    assert parsed == f"Potluck-Merge: {want}\n"
    sources = res["merge_sources"]
    by = {s: sorted(k for k, v in sources.items() if v == s) for s in set(sources.values())}
    assert by["ties"] == [
        f"h.1.{n}.weight" for n in ("attn.proj", "attn.qkv", "ln_1", "ln_2", "mlp.fc", "mlp.proj")
    ]
    assert by["branch"] == ["wpe", "wte"] and len(by["main"]) == 4 and "WRONG" not in by
    assert "  changed on both → TIES-merged (density=0.5, seed=0)       6  h.1.{attn" in text
    assert "  changed on the branch only → from theirs exactly          2  wpe, wte" in text


def _check_patch(res: dict) -> None:
    root, work = Path(res["root"]), Path(res["patch_root"])
    patch_size = (work / "contrib.patch").stat().st_size
    full = (root / FILE).stat().st_size
    assert res["patch_bytes"] == patch_size and full / patch_size >= 20
    assert res["patch_ratio"] >= 20  # type: ignore[operator]
    # the second clone's file is the contributor's model: exactly, or within the rank-4 error
    base = load_file(str(root / FILE))  # the reference reader, not potluck's
    contrib = load_file(str(work / "contrib.safetensors"))
    applied = load_file(str(work / "second" / FILE))
    assert set(applied) == set(contrib) == set(base)
    lossy = 0
    for name, want in contrib.items():
        if ".attn." not in name:
            assert np.array_equal(applied[name], want), name
            continue
        lossy += 1  # reference: the best rank-4 approximation of Δ, float64 SVD
        delta = want.astype(np.float64) - base[name]
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        ref = np.abs((u[:, :4] * s[:4]) @ vt[:4] - delta).max()
        err = np.abs(applied[name].astype(np.float64) - want).max()
        assert err <= ref + 2 * np.spacing(np.abs(want).max()), name
        assert err < 1e-3 * np.abs(delta).max(), name
    assert lossy == 8 and res["patch_ok"] is True and res["patch_hash_checked"] is True
    assert (res["patch_exact"], res["patch_lossy"]) == (8, 8)
    refused = str(res["patch_refused"])
    assert "is not the base this patch was made for: 4 tensor(s) differ" in refused
    assert "'h.1.attn.proj.weight'" in refused and res["wrong_base_written"] is False


def test_demo_history_storage_merge_share_and_patch(tmp_path: Path) -> None:
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", log=lines.append)
    assert res["checkout_ok"] is True
    rows = {r.label.split(":")[0]: r for r in res["rows"]}  # type: ignore[attr-defined]
    sparse = rows["v3"]
    assert sparse.stored_growth < 0.01 * sparse.logical  # 0.5 % of one matrix changed
    assert rows["v2"].stored_growth < 0.65 * rows["v2"].logical  # dense small update
    assert res["stored"] < 0.5 * res["full"]  # type: ignore[operator]
    text = "\n".join(lines)
    assert "changed  h.2.mlp.proj.weight" in text and "changed=0.50%" in text
    _check_merge_provenance(res, text)
    # sharing: push to a bare repo, clone only `wte`, load one tensor on demand, pull the rest
    assert res["pull_ok"] is True
    [row] = res["partial_status"]  # type: ignore[misc]
    assert (row["tensors"], row["tensors_missing"]) == (36, 35)
    tensor = res["on_demand_tensor_bytes"]
    assert 0 < res["on_demand_bytes"] <= tensor * 1.01  # type: ignore[operator]
    _check_patch(res)
