"""A merge commit says how potluck merged the weights (``Potluck-Merge:`` trailers), through real
`git merge`, `git commit` and `potluck resolve`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import potluck
from conftest import BIN, Run, model, run_in, save_st
from potluck.git import setup
from potluck.git.plumbing import Git
from potluck.merging import MERGE_METHODS
from test_vcs import commit

#: TIES' parameters with defaults filled in; the rule gives density (0.2) only.
TIES = MERGE_METHODS.get("ties").resolve_params({"density": 0.2})
RULES = [
    {"path": "*.safetensors", "tensors": "embed", "method": "ours"},
    {
        "path": "*.safetensors",
        "tensors": "layers.*.w",
        "method": "ties",
        "params": {"density": 0.2},
        "seed": 7,
    },
]
#: What the trailer must say: resolved TIES parameters (defaults included) and the seed.
TIES_LABEL = (
    "ties("
    + ", ".join(
        f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in sorted(TIES.items())
    )
    + ", seed=7)"
)


def _record(repo: Path) -> Path:
    return repo / ".git" / "potluck" / setup.MERGE_RECORD


def _message(git: Run) -> str:
    return git("git", "log", "-1", "--format=%B")


def _parsed_trailers(git: Run) -> list[str]:
    msg = _message(git)
    out = git("git", "interpret-trailers", "--parse", input=msg.encode())
    return [ln for ln in out.splitlines() if ln]


def _three(rng: np.random.Generator) -> tuple[dict, dict, dict]:
    """base; ours changes embed, layers.0.w, layers.1.w, layers.0.b; theirs changes embed,
    layers.0.w, layers.1.w, layers.2.b, layers.2.w (one-sided: 2 from theirs, 1 from ours)."""
    base = model(rng)

    def bump(d: dict, names: list[str], scale: float) -> dict:
        return dict(
            d, **{n: (d[n] + scale * rng.normal(size=d[n].shape)).astype(np.float32) for n in names}
        )

    ours = bump(base, ["embed", "layers.0.w", "layers.1.w", "layers.0.b"], 0.01)
    theirs = bump(base, ["embed", "layers.0.w", "layers.1.w", "layers.2.b", "layers.2.w"], 0.01)
    return base, ours, theirs


Sides = tuple[dict, dict, dict]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Sides]:
    """Built once: a repository with RULES committed, ``m.safetensors`` at base, branch
    ``feature`` (theirs) and ``main`` (ours, checked out). Tests work on copies."""
    top = tmp_path_factory.mktemp("merge_record")
    (top / "home").mkdir()
    env = dict(
        os.environ,
        HOME=str(top / "home"),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="T",
        GIT_AUTHOR_EMAIL="t@example.invalid",
        GIT_COMMITTER_NAME="T",
        GIT_COMMITTER_EMAIL="t@example.invalid",
        PATH=BIN + os.pathsep + os.environ.get("PATH", ""),
    )
    root = top / "repo"
    root.mkdir()

    def git(*args: str) -> None:
        subprocess.run(args, cwd=root, env=env, check=True, capture_output=True)

    def commit_file(name: str, msg: str) -> None:
        git("git", "add", name)
        git("git", "commit", "-q", "-m", msg)

    git("git", "init", "-q", "-b", "main")
    git("potluck", "init")
    git("potluck", "track", "*.safetensors")
    (root / ".potluck.json").write_text(json.dumps({"merge": RULES}))
    git("git", "add", ".gitattributes")
    commit_file(".potluck.json", "track; merge rules")
    base, ours, theirs = _three(np.random.default_rng(1234))
    for msg, tensors in (("base", base), ("theirs", theirs), ("ours", ours)):
        if msg == "ours":
            git("git", "switch", "-q", "main")
        save_st(root / "m.safetensors", tensors)
        commit_file("m.safetensors", msg)
        if msg == "base":
            git("git", "switch", "-q", "-c", "feature")
    return root, (base, ours, theirs)


def _copy(template: tuple[Path, Sides], tmp_path: Path, rules: list | None = None):
    """A copy of the template repository (with other merge ``rules`` committed on main)."""
    root = tmp_path / "copy"
    shutil.copytree(template[0], root, symlinks=True)
    git = run_in(root)
    if rules is not None:
        (root / ".potluck.json").write_text(json.dumps({"merge": rules}))
        commit(git, ".potluck.json", "other rules")
    return root, git, template[1]


def test_init_installs_the_hook_chained_after_an_existing_one(repo: Path, git: Run) -> None:
    hook = repo / ".git" / "hooks" / "prepare-commit-msg"
    text = hook.read_text()
    assert text.startswith("#!/bin/sh\n") and 'prepare-commit-msg "$@" || exit $?; fi' in text
    assert os.access(hook, os.X_OK)
    hook.write_text('#!/bin/sh\necho other-tool >> "$1"\n')
    git("potluck", "init")
    lines = hook.read_text().splitlines()
    assert lines[1] == 'echo other-tool >> "$1"' and "prepare-commit-msg" in lines[2]
    git("potluck", "init")
    assert hook.read_text().splitlines() == lines  # idempotent
    (repo / "a.txt").write_text("a")
    commit(git, "a.txt", "plain")  # no record: potluck's line is a no-op, the other tool ran
    assert _message(git).split() == ["plain", "other-tool"]


def test_clean_merge_commit_carries_method_parameters_and_counts(
    template: tuple[Path, Sides], tmp_path: Path
) -> None:
    repo, git, (base, ours, theirs) = _copy(template, tmp_path)
    git("git", "merge", "-q", "--no-edit", "feature")  # no conflict: the rules decide
    want = (
        f"Potluck-Merge: m.safetensors: ours 1 tensor; {TIES_LABEL} 2 tensors; "
        "one-sided: 2 from theirs, 1 from ours"
    )
    assert "density=0.2, " in TIES_LABEL and "lambda_=1.0, " in TIES_LABEL
    assert _message(git).strip().splitlines() == ["Merge branch 'feature'", "", want]
    assert _parsed_trailers(git) == [want]
    assert len(git("git", "rev-list", "--parents", "-n1", "HEAD").split()) == 3
    rows = json.loads(git("potluck", "log", "m.safetensors", "--json"))
    assert [r["subject"] for r in rows] == ["Merge branch 'feature'", "ours", "theirs", "base"]
    assert [r["merge"] for r in rows] == [[want.removeprefix("Potluck-Merge: ")], None, None, None]
    # the trailer describes the committed weights: TIES computed directly, sides exactly
    got = potluck.load(str(repo / "m.safetensors"), rev="HEAD")
    ties = MERGE_METHODS.get("ties")
    for name in ("layers.0.w", "layers.1.w"):
        direct = ties.merge(
            [ours[name], theirs[name]], base[name], None, name=name, seed=7, **TIES
        ).astype(np.float32)
        assert np.array_equal(got[name], direct), name
    for name, side in (
        ("embed", ours),
        ("layers.2.b", theirs),
        ("layers.2.w", theirs),
        ("layers.0.b", ours),
        ("layers.1.b", base),
    ):
        assert np.array_equal(got[name], side[name]), name
    # a fast-forward makes no merge commit; the next ordinary commit clears the record
    git("git", "switch", "-q", "-c", "ahead")
    save_st(repo / "m.safetensors", dict(got, embed=got["embed"] + 1))
    commit(git, "m.safetensors", "ahead")
    assert not _record(repo).exists()
    git("git", "switch", "-q", "main")
    git("git", "merge", "-q", "ahead")
    assert _message(git).strip() == "ahead"


def test_record_holds_blobs_and_resolved_parameters(
    template: tuple[Path, Sides], tmp_path: Path
) -> None:
    repo, git, _ = _copy(template, tmp_path)
    git("git", "merge", "-q", "--no-commit", "feature")
    [line] = _record(repo).read_text().splitlines()
    rec = json.loads(line)
    g = Git(repo)
    assert rec["head"] == g.rev_parse("HEAD")
    base_commit = g.merge_base("HEAD", "feature")
    assert rec["blobs"] == {
        "base": g.rev_parse(f"{base_commit}:m.safetensors"),
        "ours": g.rev_parse("HEAD:m.safetensors"),
        "theirs": g.rev_parse("feature:m.safetensors"),
        "result": g.rev_parse(":m.safetensors"),
    }
    assert rec["combined"] == [
        {"method": "ours", "params": {}, "seed": None, "tensors": ["embed"]},
        {"method": "ties", "params": TIES, "seed": 7, "tensors": ["layers.0.w", "layers.1.w"]},
    ]
    assert sorted(rec["from_theirs"]) == ["layers.2.b", "layers.2.w"]
    assert rec["from_ours"] == ["layers.0.b"] and rec["conflicts"] == []
    git("git", "commit", "-q", "-m", "merged by hand")  # `-m`: hook source is "message"
    assert f"{TIES_LABEL} 2 tensors" in _parsed_trailers(git)[0]


def test_merge_the_driver_never_ran_for_gets_no_trailer(
    template: tuple[Path, Sides], tmp_path: Path
) -> None:
    repo, git, _ = _copy(template, tmp_path)
    git("git", "switch", "-q", "-c", "other")
    (repo / "a.txt").write_text("a")
    commit(git, "a.txt", "text only")
    git("git", "switch", "-q", "main")
    git("git", "merge", "-q", "--no-edit", "--no-ff", "other")
    assert "Potluck-Merge" not in _message(git) and not _record(repo).exists()


def test_conflict_resolved_with_potluck_resolve_gets_the_trailer(
    template: tuple[Path, Sides], tmp_path: Path
) -> None:
    repo, git, (_, _, theirs) = _copy(template, tmp_path, [RULES[1]])  # embed: a conflict
    out = git("git", "merge", "--no-edit", "feature", check=False)
    assert "CONFLICT" in out
    git("potluck", "resolve", "m.safetensors", "--take", "theirs")
    git("git", "commit", "-q", "--no-edit")
    want = (
        f"Potluck-Merge: m.safetensors: {TIES_LABEL} 2 tensors; one-sided: 2 from theirs, "
        "1 from ours; conflicts: 1 theirs (potluck resolve)"
    )
    assert _parsed_trailers(git) == [want]
    got = potluck.load(str(repo / "m.safetensors"), rev="HEAD")
    assert np.array_equal(got["embed"], theirs["embed"])


def test_hand_resolution_gets_no_trailer(template: tuple[Path, Sides], tmp_path: Path) -> None:
    repo, git, _ = _copy(template, tmp_path, [RULES[1]])
    git("git", "merge", "--no-edit", "feature", check=False)
    git("git", "checkout", "--theirs", "m.safetensors")  # theirs whole: no TIES in the file
    git("git", "add", "m.safetensors")
    git("git", "commit", "-q", "--no-edit")
    assert "Potluck-Merge" not in _message(git) and not _record(repo).exists()


def test_aborted_merge_does_not_leak_into_a_later_merge(
    template: tuple[Path, Sides], tmp_path: Path
) -> None:
    repo, git, _ = _copy(template, tmp_path, [RULES[1]])
    git("git", "merge", "--no-edit", "feature", check=False)  # conflict on embed
    assert _record(repo).exists()
    git("git", "merge", "--abort")
    # same HEAD, same MERGE_HEAD, same blobs, but the driver does not run: no trailer
    git("git", "merge", "-q", "--no-edit", "-s", "ours", "feature")
    assert "Potluck-Merge" not in _message(git)
    assert not _record(repo).exists()  # this merge commit dropped the stale entry
