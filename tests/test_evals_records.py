"""Evaluation records, outcomes and suites: validation with exact errors, nothing half-stored."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import Run
from potluck.errors import UserError
from potluck.git.evalstore import EVALS_REF, records_for, store_records
from potluck.git.repo import Repo
from potluck.ops.evals.records import EvalRecord, make_outcomes, paired, record_from_dict
from potluck.ops.evals.suite import load_suite

W = "ab" * 32


def _record(**kw: object) -> EvalRecord:
    base = {"potluck_eval": "1", "weights": W, "suite": {"task": "t", "digest": "cd" * 32},
            "metric": "accuracy", "direction": "higher", "value": 0.5, "stderr": 0.1, "n": 10,
            "trust": "verified", "runner": {"name": "test"}}  # fmt: skip
    return record_from_dict({**base, **kw})


def test_record_round_trip_and_id() -> None:
    rec = _record()
    again = record_from_dict(json.loads(rec.dumps()))
    assert again == rec and again.id == rec.id
    assert rec.dumps().startswith(b'{"batch_size":null,"device":null,"direction":"higher",')
    assert _record(value=0.6).id != rec.id


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("weights", "abc", "evaluation record: bad weights 'abc'"),
        ("trust", "trusted", "evaluation record: bad trust 'trusted'"),
        ("value", float("nan"), "evaluation record: bad value nan"),
        ("n", -1, "evaluation record: bad n -1"),
        ("direction", "up", "evaluation record: bad direction 'up'"),
        ("outcomes", "x", "evaluation record: bad outcomes 'x'"),
        ("potluck_eval", "2", "not a potluck evaluation record (schema 'potluck_eval': '1')"),
    ],
)
def test_bad_records_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(UserError) as e:
        _record(**{field: value})
    assert e.value.message == message


def test_outcomes_need_unique_ids_and_pair_only_the_same_items() -> None:
    with pytest.raises(UserError, match="one value per item and unique item ids"):
        make_outcomes(["a", "a"], [1, 0])
    a = make_outcomes(["x", "y", "z"], [1, 0, 1])
    b = make_outcomes(["z", "x", "y"], [0, 1, 1])
    base, cand = paired(a, b)
    assert base.tolist() == [1, 0, 1] and cand.tolist() == [1, 1, 0]
    with pytest.raises(UserError, match=r"cover different items \(2 not in both\)"):
        paired(a, make_outcomes(["x", "y", "w"], [1, 1, 1]))


def test_suite_errors_name_the_file_and_task(tmp_path: Path) -> None:
    suite = tmp_path / "s.yaml"
    suite.write_text("potluck_suite: 1\ntasks:\n  - name: t\n    dataset: {path: d.jsonl}\n")
    with pytest.raises(UserError) as e:
        load_suite(suite)
    assert e.value.message == f"{suite}: task t: dataset file {tmp_path / 'd.jsonl'} does not exist"
    (tmp_path / "d.jsonl").write_text('{"id": "1", "label": 0}\nnot json\n')
    with pytest.raises(UserError) as e:
        load_suite(suite)
    assert e.value.message == f"{tmp_path / 'd.jsonl'}:2: not JSON"
    suite.write_text("potluck_suite: 1\ntasks:\n  - name: t\n    metric: f1\n")
    with pytest.raises(UserError) as e:
        load_suite(suite)
    assert e.value.message == f"{suite}: task t: unknown metric 'f1'"
    # the digest covers the data: one changed label is another suite
    (tmp_path / "d.jsonl").write_text('{"id": "1", "label": 0}\n')
    suite.write_text("potluck_suite: 1\ntasks:\n  - name: t\n    dataset: {path: d.jsonl}\n")
    d1 = load_suite(suite).tasks[0].digest
    (tmp_path / "d.jsonl").write_text('{"id": "1", "label": 1}\n')
    assert load_suite(suite).tasks[0].digest != d1


def test_a_record_whose_outcomes_are_not_stored_is_refused(repo: Path, git: Run) -> None:
    r = Repo(repo)
    rec = _record(outcomes="ef" * 32)
    with pytest.raises(UserError, match="references outcomes efefefefefef that are not stored"):
        store_records(r, [rec])
    assert git("git", "rev-parse", "-q", "--verify", EVALS_REF, check=False) == ""
    oc = make_outcomes(["a", "b"], np.array([1.0, 0.0]))
    with_oc = _record(outcomes=oc.oid)
    assert store_records(r, [with_oc], [oc]) == [with_oc.id]
    assert records_for(r, W) == [with_oc]
    # the outcomes are stored now: a second record may reference them alone
    store_records(r, [_record(outcomes=oc.oid, value=0.7)])
    assert [x.value for x in records_for(r, W)] == sorted(
        [0.5, 0.7], key=lambda v: _record(outcomes=oc.oid, value=v).id
    )
