"""Evaluation records travel with plain ``git push`` / ``git fetch`` / ``git pull`` /
``git clone`` (``potluck.git.evalsync``): real git, a bare hub, several clones."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from conftest import Run, model, run_in, save_st
from potluck.git.evalstore import EVALS_REF, absorb, records_for, store_records
from potluck.git.evalsync import fetch_refspec
from potluck.git.repo import Repo
from potluck.ops.evals.records import EvalRecord, record_from_dict
from potluck.ops.lineage import weights_digest_of

W = "ab" * 32


def _record(task: str, weights: str = W) -> EvalRecord:
    return record_from_dict({
        "potluck_eval": "1", "weights": weights, "suite": {"task": task, "digest": "cd" * 32},
        "metric": "accuracy", "direction": "higher", "value": 0.5, "stderr": 0.1, "n": 10,
        "trust": "verified", "runner": {"name": "test"},
    })  # fmt: skip


def _clone(hub: Path, dest: Path) -> Run:
    """Plain ``git clone``, then ``potluck init`` (as a user would)."""
    run_in(dest.parent)("git", "clone", "-q", str(hub), str(dest))
    g = run_in(dest)
    g("potluck", "init")
    return g


def _commit_and_push(g: Run, cwd: Path, branch: str) -> subprocess.CompletedProcess[str]:
    (cwd / f"{branch}.txt").write_text(branch)
    g("git", "add", f"{branch}.txt")
    g("git", "commit", "-q", "-m", branch)
    return subprocess.run(
        ["git", "push", "origin", f"HEAD:refs/heads/{branch}"],
        cwd=cwd, capture_output=True, text=True, check=False,
    )  # fmt: skip


def _hub_records(hub: Path) -> list[str]:
    out = run_in(hub)("git", "ls-tree", "-r", "--name-only", EVALS_REF)
    return sorted(p.rsplit("/", 1)[1] for p in out.split())


def _tasks(root: Path, weights: str = W) -> list[str]:
    return [r.task for r in records_for(Repo(root), weights)]


def test_concurrent_records_travel_with_plain_git(
    tmp_path: Path, repo: Path, git: Run, hub: Path
) -> None:
    save_st(repo / "m.safetensors", model(np.random.default_rng(0), n_layers=1, d=8))
    git("git", "add", "m.safetensors")
    git("git", "commit", "-q", "-m", "a model")
    w = weights_digest_of(repo / "m.safetensors")
    git("git", "push", "-q", "origin", "main")
    b = tmp_path / "b"
    gb = _clone(hub, b)  # the hub has no records yet: the glob refspec makes that no error
    assert gb("git", "config", "--get-all", "remote.origin.fetch").splitlines() == [
        "+refs/heads/*:refs/remotes/origin/*", fetch_refspec("origin")
    ]  # fmt: skip
    gb("git", "fetch")
    # A records, then pushes a branch: the records go along; git's output stays git's own
    rec_a, rec_b = _record("from_a", w), _record("from_b", w)
    store_records(Repo(repo), [rec_a])
    pushed = _commit_and_push(git, repo, "a")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stderr.splitlines() == [f"To {hub}", " * [new branch]      HEAD -> a"]
    assert _hub_records(hub) == [f"{rec_a.id}.json"]
    # the hook configured A's remote (added after `potluck init`) for fetching records
    assert fetch_refspec("origin") in git("git", "config", "--get-all", "remote.origin.fetch")
    # B recorded concurrently: its records push is rejected (non-fast-forward), fetched,
    # unioned and retried, all inside the hook; B's own push is untouched
    store_records(Repo(b), [rec_b])
    pushed = _commit_and_push(gb, b, "b")
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stderr.splitlines() == [f"To {hub}", " * [new branch]      HEAD -> b"]
    assert _hub_records(hub) == sorted([f"{rec_a.id}.json", f"{rec_b.id}.json"])
    assert _tasks(b, w) == ["from_a", "from_b"]
    # a third person: plain git clone + potluck init; the first read merges the records in
    c = tmp_path / "c"
    gc = _clone(hub, c)
    assert gc("git", "rev-parse", "-q", "--verify", EVALS_REF, check=False) == ""
    listed = json.loads(gc("potluck", "eval", "list", "main", "--json"))
    assert (listed["weights"], [r["suite"]["task"] for r in listed["records"]]) == (
        w, ["from_a", "from_b"]
    )  # fmt: skip
    assert gc("git", "rev-parse", EVALS_REF) == run_in(hub)("git", "rev-parse", EVALS_REF)
    # A gets B's record with a plain git pull (the fetch refspec), merged as a union
    git("git", "branch", "-q", "--set-upstream-to=origin/main")
    git("git", "pull", "-q", "--no-rebase")
    assert _tasks(repo, w) == ["from_a"]  # the local ref is only unioned when potluck reads
    assert absorb(Repo(repo)) == 1
    assert _tasks(repo, w) == ["from_a", "from_b"]


def test_a_remote_that_refuses_records_still_takes_the_push(
    tmp_path: Path, repo: Path, git: Run, hub: Path
) -> None:
    hook = hub / "hooks" / "pre-receive"
    hook.write_text(
        "#!/bin/sh\nwhile read old new ref; do case $ref in refs/potluck/*)"
        " echo 'no potluck refs here' >&2; exit 1;; esac; done\n"
    )
    hook.chmod(0o755)
    store_records(Repo(repo), [_record("t")])
    pushed = _commit_and_push(git, repo, "a")
    assert pushed.returncode == 0, pushed.stderr
    lines = pushed.stderr.splitlines()
    assert lines[0] == (
        "potluck: warning: origin did not take the evaluation records: [remote rejected] "
        "(pre-receive hook declined): no potluck refs here"
    )
    assert lines[1:] == [f"To {hub}", " * [new branch]      HEAD -> a"]
    assert run_in(hub)("git", "rev-parse", "a") == git("git", "rev-parse", "HEAD")
    assert run_in(hub)("git", "rev-parse", "-q", "--verify", EVALS_REF, check=False) == ""


def test_eval_push_through_git_does_not_push_twice(
    tmp_path: Path, repo: Path, git: Run, hub: Path
) -> None:
    store_records(Repo(repo), [_record("t")])
    out = git("potluck", "eval", "push")
    assert out == f"pushed {EVALS_REF} to origin\n"
    # a push naming the records ref itself is left to git (the hook does not recurse)
    store_records(Repo(repo), [_record("u")])
    git("git", "push", "-q", "origin", f"{EVALS_REF}:{EVALS_REF}")
    assert run_in(hub)("git", "rev-parse", EVALS_REF) == git("git", "rev-parse", EVALS_REF)
