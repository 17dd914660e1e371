"""The demo runs end to end and its numbers hold."""

from __future__ import annotations

from pathlib import Path

from potluck.demo import run_demo


def test_demo_history_storage_and_merge(tmp_path: Path) -> None:
    lines: list[str] = []
    res = run_demo(tmp_path / "demo", log=lines.append)
    assert res["merge_ok"] is True and res["checkout_ok"] is True
    rows = {r.label.split(":")[0]: r for r in res["rows"]}  # type: ignore[attr-defined]
    sparse = rows["v3"]
    assert sparse.stored_growth < 0.01 * sparse.logical  # 0.5 % of one matrix changed
    assert rows["v2"].stored_growth < 0.65 * rows["v2"].logical  # dense small update
    assert res["stored"] < 0.5 * res["full"]  # type: ignore[operator]
    text = "\n".join(lines)
    assert "changed  h.2.mlp.proj.weight" in text and "changed=0.50%" in text
    assert "ties     6 tensors: h.1.attn.proj.weight" in text
    assert "branch   2 tensors: wpe, wte" in text
    # sharing: push to a bare repo, clone only `wte`, load one tensor on demand, pull the rest
    assert res["pull_ok"] is True
    [row] = res["partial_status"]  # type: ignore[misc]
    assert (row["tensors"], row["tensors_missing"]) == (36, 35)
    tensor = res["on_demand_tensor_bytes"]
    assert 0 < res["on_demand_bytes"] <= tensor * 1.01  # type: ignore[operator]
