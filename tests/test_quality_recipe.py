"""bench.quality's second fine-tuning recipe (LP-FT) and the table's per-task columns."""

from __future__ import annotations

from typing import Any

from bench.common import finetune
from bench.quality import report, stages


def test_lpft_recipe_has_its_own_cache_key_and_leaves_the_first_one_alone() -> None:
    base = stages.finetune_config("vader_words", 0, 200)
    lpft = stages.finetune_config("vader_words", 0, 200, "lpft")
    assert "head_init" not in base.key_fields()
    assert base == finetune.FinetuneConfig(task="vader_words", seed=0, steps=200, threads=2)
    assert lpft.key_fields()["head_init"] == "probe"
    assert {k: v for k, v in lpft.key_fields().items() if k != "head_init"} == base.key_fields()


def _results() -> dict[str, Any]:
    probe = {"a": {"test_acc": 0.5}, "b": {"test_acc": 0.9}}
    tasks = {
        "a": {"bytes": 1000, "bits_per_parameter": 1.0, "parameters": 8000},
        "b": {"bytes": 3000, "bits_per_parameter": 1.2, "parameters": 20000},
    }
    cfg = {"parameters": {"lambda": 1.0}, "models": [{"parameters": {"weight": 1.0}}]}
    return {
        "probe": probe,
        "individual": {"a": 0.9, "b": 0.92},
        "merges": {
            "ties": {"test": {"a": 0.7, "b": 0.9}, "config": cfg, "merge_s": 3.5},
            "emr + task masks": {
                "test": {"a": 0.88, "b": 0.92},
                "config": cfg,
                "tasks": tasks,
                "merge_s": 7.0,
            },
        },
    }


def test_extra_bytes_per_task_and_bits_per_parameter() -> None:
    r = _results()
    assert report.extra(r["merges"]["ties"]) == (0.0, 0.0)
    assert report.extra(r["merges"]["emr + task masks"]) == (2000.0, 1.1)


def test_merge_table_rows_carry_extra_size_and_merge_time() -> None:
    lines = report.merge_table(_results()).splitlines()
    assert lines[0].endswith("| avg | normalised | gain kept % (a) | extra per task | merge s |")
    assert lines[4] == "| merge: ties (lambda=1.0) | 70.0 | 90.0 | 80.0 | 87.8 | 50 | 0 | 3.5 |"
    assert lines[5] == (
        "| merge: emr + task masks (lambda=1.0) | 88.0 | 92.0 | 90.0 | 98.9 | 95 |"
        " 0.00 MB (1.100 bit/param) | 7.0 |"
    )


def test_gain_table_per_gain_task() -> None:
    assert report.gain_table(_results()).splitlines() == [
        "| merge | a | mean |",
        "|---|---|---|",
        "| ties | 50 | 50 |",
        "| emr + task masks | 95 | 95 |",
    ]
