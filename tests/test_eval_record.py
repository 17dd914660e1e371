"""Evaluation results as git notes (``potluck eval record|show``), with real git.

The reference is git itself: notes are read back with ``git notes --ref refs/notes/potluck-evals
show`` and parsed as plain JSON, independent of ``potluck.git.evalrec``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import Run
from potluck.cli import eval_cmd  # noqa: F401  (registers the ``eval`` group)
from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.git import evalrec
from potluck.git.plumbing import Git
from test_vcs import commit

REF = "refs/notes/potluck-evals"


def _raw_note(git: Run, rev: str) -> dict:
    return json.loads(git("git", "notes", "--ref", REF, "show", rev))


def _invoke(repo: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    monkeypatch.chdir(repo)
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _history(repo: Path, git: Run) -> dict[str, str]:
    """main: c0 → a (branch side); main: c0 → b; m = merge of side into main."""
    (repo / "f.txt").write_text("0\n")
    c0 = commit(git, "f.txt", "c0")
    git("git", "switch", "-q", "-c", "side")
    (repo / "g.txt").write_text("a\n")
    a = commit(git, "g.txt", "a")
    git("git", "switch", "-q", "main")
    (repo / "f.txt").write_text("b\n")
    b = commit(git, "f.txt", "b")
    git("git", "merge", "-q", "--no-edit", "side")
    m = git("git", "rev-parse", "HEAD").strip()
    return {"c0": c0, "a": a, "b": b, "m": m}


def test_record_writes_a_json_note_and_merges_entries(repo: Path, git: Run) -> None:
    h = _history(repo, git)
    g = Git(repo)
    commit_id, held = evalrec.record_evals(g, "side", {"topic": {"accuracy": 0.875}})
    assert commit_id == h["a"] and held == {"topic": {"accuracy": 0.875}}
    assert _raw_note(git, h["a"]) == {
        "potluck_evals": "1",
        "results": {"topic": {"accuracy": 0.875}},
    }
    evalrec.record_evals(g, h["a"], {"topic": {"f1": 0.5, "accuracy": 0.9}, "lang": {"acc": 1}})
    assert _raw_note(git, h["a"])["results"] == {
        "lang": {"acc": 1.0},
        "topic": {"accuracy": 0.9, "f1": 0.5},
    }
    # other commits are untouched; one note object per commit under the notes ref
    assert evalrec.read_evals(g, h["b"]) == {}
    listed = git("git", "notes", "--ref", REF, "list").split()
    assert listed[1::2] == [h["a"]]
    assert git("git", "rev-parse", "--verify", "-q", REF).strip()
    assert evalrec.evals_for(g, [h["a"], h["b"]]) == {
        h["a"]: _raw_note(git, h["a"])["results"],
        h["b"]: {},
    }


def test_cli_record_metrics_and_json_file(
    repo: Path, git: Run, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    h = _history(repo, git)
    code, out, _ = _invoke(repo, monkeypatch, "eval", "record", h["b"], "--task", "topic",
                           "--metric", "accuracy=0.75", "--metric", "loss=1.25")  # fmt: skip
    assert code == 0 and out.startswith(h["b"][:10])
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"lang": {"accuracy": 0.5}, "topic": {"accuracy": 0.8}}))
    code, out, _ = _invoke(repo, monkeypatch, "eval", "record", h["b"], "--json-file", str(f),
                           "--json")  # fmt: skip
    assert code == 0
    want = {"lang": {"accuracy": 0.5}, "topic": {"accuracy": 0.8, "loss": 1.25}}
    assert json.loads(out) == {"commit": h["b"], "results": want}
    assert _raw_note(git, h["b"])["results"] == want
    g = tmp_path / "m.json"
    g.write_text(json.dumps({"accuracy": 0.6}))
    code, _, _ = _invoke(repo, monkeypatch, "eval", "record", "--task", "x", "--json-file", str(g))
    assert code == 0 and _raw_note(git, "HEAD")["results"] == {"x": {"accuracy": 0.6}}


def test_show_marks_a_merge_that_regresses_a_task(
    repo: Path, git: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = _history(repo, git)
    g = Git(repo)
    evalrec.record_evals(g, h["a"], {"topic": {"accuracy": 0.9}})
    evalrec.record_evals(g, h["b"], {"lang": {"accuracy": 0.8}, "topic": {"accuracy": 0.7}})
    evalrec.record_evals(g, h["m"], {"topic": {"accuracy": 0.85}, "lang": {"accuracy": 0.82}})
    code, out, _ = _invoke(repo, monkeypatch, "eval", "show", "--json", "HEAD")
    assert code == 0
    rows = json.loads(out)[0]["results"]
    by = {(r["task"], r["metric"]): r for r in rows}
    assert by[("topic", "accuracy")]["parent_best"] == 0.9
    assert by[("topic", "accuracy")]["delta"] == pytest.approx(0.85 - 0.9)
    assert by[("lang", "accuracy")]["delta"] == pytest.approx(0.82 - 0.8)
    code, out, _ = _invoke(repo, monkeypatch, "eval", "show", "HEAD", h["c0"])
    lines = out.splitlines()
    assert lines[0].startswith(h["m"][:10])
    topic = next(ln for ln in lines if "topic" in ln)
    lang = next(ln for ln in lines if "lang" in ln)
    assert topic.endswith("REGRESSION") and "(-0.0500)" in topic
    assert not lang.endswith("REGRESSION") and "(+0.0200)" in lang
    assert lines[-1] == f"{h['c0'][:10]} ({h['c0']}): no results recorded"


ERRORS = [
    (["--task", "t", "--metric", "accuracy"], "bad metric 'accuracy'"),
    (["--task", "t", "--metric", "accuracy=high"], "bad metric value in 'accuracy=high'"),
    (["--task", "t", "--metric", "accuracy=nan"], "is not a finite number"),
    (["--metric", "accuracy=0.5"], "--metric needs --task"),
    (["nosuchrev", "--task", "t", "--metric", "a=1"], "'nosuchrev' is not a commit"),
    (["--task", "t=x", "--metric", "a=1"], "bad task name 't=x'"),
    ([], "nothing to record"),
]


def test_record_errors_write_nothing(repo: Path, git: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    _history(repo, git)
    for args, message in ERRORS:
        code, _, err = _invoke(repo, monkeypatch, "eval", "record", *args)
        assert code == UserError.exit_code and message in err, (args, err)
    assert git("git", "notes", "--ref", REF, "list") == ""


def test_a_foreign_note_is_refused_not_overwritten(repo: Path, git: Run) -> None:
    h = _history(repo, git)
    git("git", "notes", "--ref", REF, "add", "-m", "hand-written", h["b"])
    with pytest.raises(UserError, match="is not a potluck evaluation record"):
        evalrec.record_evals(Git(repo), h["b"], {"t": {"accuracy": 1.0}})
    assert git("git", "notes", "--ref", REF, "show", h["b"]) == "hand-written\n"
