"""bench/quality's task-part rows: a cached ``tall_masks`` row of another ``mask_lambda`` grid
is set aside and computed again; a row of the current grid and the ``emr`` row are reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


def _row(lambdas: list[float], acc: float) -> dict[str, Any]:
    return {"grid": [{"mask_lambda": lam} for lam in lambdas], "test": {"t": acc}}


@pytest.mark.parametrize("old", [[0.2, 0.4, 0.6], [0.2, 0.3, 0.4, 0.5, 0.6]])
def test_tall_masks_cache_follows_the_grid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old: list[float]
) -> None:
    from bench.quality import taskparts

    assert list(taskparts.MASK_LAMBDAS) == [0.2, 0.3, 0.4, 0.5, 0.6]  # the authors' grid
    calls: list[str] = []

    def fresh(*_args: Any) -> dict[str, Any]:
        calls.append("tall_masks")
        return _row([0.2, 0.3, 0.4, 0.5, 0.6], 0.9)

    def no_emr(*_args: Any) -> dict[str, Any]:
        raise AssertionError("the cached emr row must be reused")

    monkeypatch.setattr(taskparts, "link_inputs", lambda _c, _f: [])
    monkeypatch.setattr(taskparts, "tall_masks", fresh)
    monkeypatch.setattr(taskparts, "emr", no_emr)
    cached = _row(old, 0.5)
    (tmp_path / "tall_masks.json").write_text(json.dumps(cached))
    (tmp_path / "emr.json").write_text(json.dumps({"test": {"t": 0.7}}))

    out = taskparts.run([], tmp_path, lambda _p, _t: 0.0, lambda _p, _t: 0.0, seed=0)

    assert out["emr"] == {"test": {"t": 0.7}}
    if len(old) == 5:
        assert calls == [] and out["tall_masks"] == cached
        assert not (tmp_path / "tall_masks-grid5.json").exists()
    else:
        assert calls == ["tall_masks"] and out["tall_masks"]["test"] == {"t": 0.9}
        assert json.loads((tmp_path / "tall_masks-grid3.json").read_text()) == cached
        assert json.loads((tmp_path / "tall_masks.json").read_text()) == out["tall_masks"]
