"""bench.quality.communal: evaluation records of the bench's models, the gate, the report.

The smoke run (``--smoke``: tiny splits, three fine-tuning steps, two merges) goes through the
real ``potluck eval run`` / ``gate`` / ``report`` commands in a scratch repository. References:
the accuracies ``stages.Evaluator`` computes here from the same weight files (the bench's own
scorer, run independently of potluck), their differences for the gate's effect, and the gate's
decision rule applied to its printed interval. Needs the packaged data and model (see
tests/test_quality_data.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.common import data, finetune
from bench.quality import communal, stages

POTLUCK = str(Path(sys.executable).parent / "potluck")


def test_missing_bench_results_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--results", str(tmp_path / "none"), "--work", str(tmp_path / "w")]
    assert communal.main([*argv, "--tasks", "vader_words"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: vader_words: no cached fine-tune vader_words-")
    assert "run `python -m bench.quality` first" in err
    with pytest.raises(SystemExit) as e:
        communal.main([*argv, "--tolerance", "-0.1"])
    assert e.value.code == 2


def test_heads_file_round_trip(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    files = {}
    for task, k in (("a", 2), ("b", 5)):
        torch.manual_seed(k)
        h = torch.nn.Linear(384, k)
        files[task] = tmp_path / f"{task}.safetensors"
        save_file({n: v.detach() for n, v in h.state_dict().items()}, str(files[task]))
    out = communal.save_heads(files, tmp_path / "heads.safetensors")
    assert sorted(load_file(str(out))) == ["a.bias", "a.weight", "b.bias", "b.weight"]
    back = communal.load_heads(out)
    for task, path in files.items():
        ref = finetune.load_head(path)
        assert torch.equal(back[task].weight, ref.weight) and torch.equal(back[task].bias, ref.bias)


def _listed(repo: Path, rev: str) -> dict[str, dict[str, Any]]:
    got = subprocess.run([POTLUCK, "eval", "list", rev, "--json"], cwd=repo, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return {r["suite"]["task"]: r for r in json.loads(got)["records"] if r["kind"] == "score"}


@pytest.mark.heavy
@pytest.mark.timeout(1800)  # 3.4 min at load 9, 20 min at load 16-20 (2 cores): 11 potluck commands
def test_smoke_records_equal_the_bench_scores(tmp_path: Path) -> None:
    out = tmp_path / "communal.json"
    argv = ["--smoke", "--work", str(tmp_path / "w"), "--out", str(out), "--tolerance", "0.05"]
    assert communal.main(argv) == 0
    res = json.loads(out.read_text())
    tasks = [data.load_task(n, caps=communal.SMOKE_CAPS) for n in communal.SMOKE_TASKS]
    n_test = {t.name: len(t.test) for t in tasks}
    ev = stages.Evaluator(tasks, "test")
    repo = Path(res["repo"])
    ref: dict[str, dict[str, float]] = {}
    for branch, weights in res["weights"].items():
        heads = {t: finetune.load_head(Path(p)) for t, p in res["heads"][branch].items()}
        ref[branch] = ev.scores(None if branch == "main" else Path(weights), heads)
        listed = _listed(repo, branch)
        assert sorted(listed) == sorted(heads)  # main, merges: every task; a contributor: its own
        for task, rec in listed.items():
            assert rec["value"] == ref[branch][task], (branch, task)
            assert rec["n"] == n_test[task] and rec["trust"] == "verified" and rec["outcomes"]
    assert sorted(res["weights"]) == [
        "contrib/fortune_lang", "contrib/vader_words", "main", "merge/linear",
        "merge/task_arithmetic",
    ]  # fmt: skip
    best = f"merge/{res['best']}"
    vals = {b: v for b, v in res["val_mean"].items()}
    assert vals[best] == max(vals.values())
    for task in n_test:
        for base, gate in ((f"contrib/{task}", res["gates"][task]["tasks"][0]),
                           ("main", next(g for g in res["gates"]["main"]["tasks"]
                                         if g["task"] == task))):  # fmt: skip
            t = gate["test"]
            assert gate["task"] == task and t["n"] == n_test[task]
            assert t["mean_diff"] == pytest.approx(ref[best][task] - ref[base][task], abs=1e-12)
            lo, hi = t["lo"], t["hi"]
            expect = "pass" if lo > -0.05 else "fail" if hi < -0.05 else "inconclusive"
            assert gate["verdict"] == expect and lo <= t["mean_diff"] <= hi
    lines = res["report"].splitlines()
    assert lines[0] == "## potluck report `main..{}`".format(best.replace("_", "\\_"))
    for g in res["gates"]["main"]["tasks"]:  # the report's row of each task: the gate's verdict
        name = g["task"].replace("_", "\\_")
        row = next(x for x in lines if x.startswith(f"| {name} | accuracy |"))
        assert row.endswith(f"| **{g['verdict']}** |")
