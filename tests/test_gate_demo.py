"""The communal story of ``potluck demo`` (demo/communal_story.py) runs and catches what it
claims: the harmless merge passes the gate, the regression fails it and cannot be promoted."""

from __future__ import annotations

from pathlib import Path

import pytest

from potluck.demo.communal_story import communal_story


@pytest.mark.heavy  # ~10 s of CPU; test_demo runs the same story inside run_demo
def test_communal_story(tmp_path: Path) -> None:
    lines: list[str] = []
    res = communal_story(tmp_path / "communal", lines.append)
    assert (res["gate_pass"], res["gate_fail"]) == (True, True)
    assert res["promote_refused"] == (
        "refusing to promote merge-bob as stable: no passing gate record for any task on its "
        f"weights {str(res['promote_refused']).split()[-1]}"
    )
    assert res["lineage_relations"] == ["merge", "finetune", "finetune"]
    md = str(res["report_md"]).splitlines()
    assert next(x for x in md if x.startswith("| agree |")).endswith("| **fail** |")
    assert str(res["rebase_out"]).startswith("6 patched tensor(s), 2 conflict(s) resolved by")
    assert "  verdict: pass (exit 0)" in lines and "  verdict: fail (exit 1)" in lines
