"""potluck.git.plumbing, attributes and setup against real git repositories in tmp dirs."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from potluck.errors import GitError, UserError
from potluck.git import attributes, setup
from potluck.git.plumbing import CatFileBatch, Git


def sh(cwd: Path, *args: str, input: bytes | None = None) -> str:
    """Run git directly (independent of the code under test)."""
    out = subprocess.run(["git", *args], cwd=cwd, input=input, capture_output=True, check=True)
    return out.stdout.decode()


@pytest.fixture(autouse=True)
def _isolated_git(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(home.parent.parent))
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    sh(root, "init", "-q", "-b", "main")
    sh(root, "config", "user.name", "T")
    sh(root, "config", "user.email", "t@example.com")
    return root


def commit(root: Path, files: dict[str, bytes], msg: str) -> str:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    sh(root, "add", "-A")
    sh(root, "commit", "-q", "-m", msg)
    return sh(root, "rev-parse", "HEAD").strip()


def blob_id(root: Path, data: bytes) -> str:
    return sh(root, "hash-object", "--stdin", input=data).strip()


# -- layout and revisions -------------------------------------------------------------------


def test_layout_and_worktrees(repo: Path, tmp_path: Path) -> None:
    commit(repo, {"a": b"1"}, "c1")
    (repo / "sub").mkdir()
    git = Git(repo / "sub")
    assert git.toplevel() == repo.resolve()
    assert git.git_dir() == (repo / ".git").resolve()
    assert git.common_dir() == (repo / ".git").resolve()
    sh(repo, "worktree", "add", "-q", str(tmp_path / "wt"), "-b", "other")
    wt = Git(tmp_path / "wt")
    assert wt.toplevel() == (tmp_path / "wt").resolve()
    assert wt.git_dir() == (repo / ".git" / "worktrees" / "wt").resolve()
    assert wt.common_dir() == (repo / ".git").resolve()
    for g in (git, wt):  # one rev-parse for both: the same answers
        assert g.toplevel_and_common_dir() == (g.toplevel(), g.common_dir())


def test_rev_parse_and_history(repo: Path) -> None:
    git = Git(repo)
    assert git.rev_parse("HEAD") is None  # unborn
    c1 = commit(repo, {"a": b"1"}, "one")
    c2 = commit(repo, {"a": b"2"}, "two")
    assert git.rev_parse("HEAD") == c2
    assert git.rev_parse("HEAD~1") == c1
    assert git.rev_parse("no-such-branch") is None
    assert git.rev_parse("--help") is None  # never taken as an option
    assert git.rev_parse("HEAD:a") == blob_id(repo, b"2")
    assert git.merge_base(c1, c2) == c1
    assert git.is_ancestor(c1, c2) and not git.is_ancestor(c2, c1)
    assert git.rev_list("HEAD") == [c2, c1]
    assert git.all_ref_commits() == [c2, c1]
    sh(repo, "checkout", "-q", "--orphan", "lonely")
    c3 = commit(repo, {"b": b"3"}, "three")
    assert git.merge_base(c2, c3) is None
    with pytest.raises(GitError):
        git.is_ancestor("nope", c3)


def test_git_error_message(repo: Path, tmp_path: Path) -> None:
    with pytest.raises(GitError, match=r"git frobnicate.*failed with exit code 1") as info:
        Git(repo).run("frobnicate")
    assert "frobnicate" in info.value.data["stderr"]
    assert info.value.hint
    outside = tmp_path / "not-a-repo"
    outside.mkdir()
    with pytest.raises(GitError, match="not a git repository") as info:
        Git(outside).toplevel()
    assert info.value.hint and "git init" in info.value.hint
    assert Git(repo).run("frobnicate", check=False) == b""


def test_config(repo: Path) -> None:
    git = Git(repo)
    assert git.config_get("potluck.x") is None
    git.config_set("potluck.x", "a b")
    assert git.config_get("potluck.x") == "a b"
    assert git.config_get("potluck.x", local=True) == "a b"
    sh(repo, "config", "--add", "potluck.x", "second")
    git.config_set("potluck.x", "only")  # replaces all values
    assert sh(repo, "config", "--get-all", "potluck.x") == "only\n"
    assert git.config_local_keys("potluck") == ["potluck.x"]
    assert git.config_unset("potluck.x") is True
    assert git.config_unset("potluck.x") is False
    assert git.config_get("potluck.x") is None


def test_config_matching_reads_keys_as_git_config_get_does(repo: Path) -> None:
    git = Git(repo)
    assert git.config_matching(["potluck.a", "potluck.b"]) == {}
    sh(repo, "config", "--add", "potluck.a", "first")
    sh(repo, "config", "--add", "potluck.a", "last wins")
    cfg = repo / ".git" / "config"
    cfg.write_text(cfg.read_text() + "[Potluck]\n\tB\n\tc = other key\n")
    got = git.config_matching(["potluck.a", "potluck.b"])
    assert got == {"potluck.a": "last wins", "potluck.b": None}
    assert got["potluck.a"] == git.config_get("potluck.a")
    cfg.write_text(cfg.read_text() + "[broken\n")
    with pytest.raises(GitError, match="bad config line"):
        git.config_matching(["potluck.a"])


# -- index, trees and blobs -----------------------------------------------------------------

ODD = ["dir with space/model a.bin", "tab\there.bin", "new\nline.bin", "ünïcode.bin"]


def test_paths_with_odd_characters(repo: Path) -> None:
    c = commit(repo, {p: p.encode() for p in ODD}, "odd")
    git = Git(repo)
    assert sorted(git.ls_files()) == sorted(ODD)
    assert git.ls_files("dir with space") == ["dir with space/model a.bin"]
    blobs = dict(git.list_blobs("HEAD"))
    assert blobs == {p: blob_id(repo, p.encode()) for p in ODD}
    assert git.list_blobs(c, ["dir with space"]) == [
        ("dir with space/model a.bin", blob_id(repo, b"dir with space/model a.bin"))
    ]
    assert git.show_blob("HEAD:dir with space/model a.bin") == b"dir with space/model a.bin"
    assert git.show_blob("HEAD:new\nline.bin") == b"new\nline.bin"


def test_show_blob_index_vs_head(repo: Path) -> None:
    commit(repo, {"m.bin": b"v1"}, "c1")
    (repo / "m.bin").write_bytes(b"v2")
    sh(repo, "add", "m.bin")
    git = Git(repo)
    assert git.show_blob("HEAD:m.bin") == b"v1"
    assert git.show_blob(":m.bin") == b"v2"
    assert git.show_blob(blob_id(repo, b"v1")) == b"v1"
    assert git.show_blob("HEAD:missing.bin") is None
    assert git.show_blob(":missing.bin") is None
    assert git.show_blob("HEAD") is None  # a commit is not a blob


def test_log_path(repo: Path) -> None:
    c1 = commit(repo, {"dir x/m.bin": b"v1", "other": b"o"}, "add")
    commit(repo, {"other": b"o2"}, "unrelated")
    c3 = commit(repo, {"dir x/m.bin": b"v2"}, "change")
    (repo / "dir x" / "m.bin").unlink()
    sh(repo, "commit", "-qam", "delete")
    c4 = sh(repo, "rev-parse", "HEAD").strip()
    git = Git(repo / "dir x")  # paths are relative to the top, wherever git runs
    assert git.log_path("dir x/m.bin") == [
        (c4, "delete", None),
        (c3, "change", blob_id(repo, b"v2")),
        (c1, "add", blob_id(repo, b"v1")),
    ]
    assert git.log_path("dir x/m.bin", 1) == [(c4, "delete", None)]
    assert git.log_path("dir x/m.bin", revs=[c3]) == git.log_path("dir x/m.bin")[1:]
    assert git.commits_with_blob(blob_id(repo, b"v2"), "dir x/m.bin") == [c3]
    assert git.log_path("never.bin") == []


def test_check_attr(repo: Path) -> None:
    (repo / ".gitattributes").write_text("*.bin filter=potluck\n")
    git = Git(repo)
    assert git.check_attr("filter", "a b.bin") == "potluck"
    assert git.check_attr("filter", "a.txt") is None
    assert git.check_attr_many("filter", ["x.bin", "y.txt"]) == {"x.bin": "potluck", "y.txt": None}


# -- cat-file --batch -----------------------------------------------------------------------


def test_cat_file_batch(repo: Path) -> None:
    big = os.urandom(5 * 1024 * 1024) + b"\n"
    c = commit(repo, {"big file.bin": big, "small": b"x\n"}, "c")
    big_id = blob_id(repo, big)
    with Git(repo).batch() as batch:
        assert isinstance(batch, CatFileBatch)
        assert batch.get(big_id) == big
        assert batch.get("HEAD:small") == b"x\n"
        assert batch.get("0" * 40) is None
        assert batch.get("HEAD:not there") is None
        assert batch.get("HEAD:big file.bin") == big  # the stream is still in sync
        assert batch.get(c).startswith(b"tree ")  # type: ignore[union-attr]
        assert batch.get("") is None
        assert batch.get("a\nb") is None  # a name with a newline: asked of a one-shot git
        assert batch.get(f"{c}:small") == b"x\n"  # and the batch stream is still in sync
    assert batch.get("HEAD:small") == b"x\n"  # restarts after close
    batch.close()


# -- reachability ---------------------------------------------------------------------------


def test_reachable_blobs(repo: Path) -> None:
    commit(repo, {"keep/m.bin": b"committed", "t.txt": b"t"}, "base")
    # reflog only: a commit dropped by a reset
    commit(repo, {"keep/m.bin": b"reflog only"}, "dropped")
    sh(repo, "reset", "-q", "--hard", "HEAD~1")
    # stash only: a modified tracked file and an untracked file
    (repo / "keep" / "m.bin").write_bytes(b"stash only")
    (repo / "untracked.bin").write_bytes(b"stash untracked")
    sh(repo, "stash", "push", "-q", "--include-untracked")
    # index only
    (repo / "keep" / "staged.bin").write_bytes(b"index only")
    sh(repo, "add", "keep/staged.bin")
    # unreachable
    dangling = sh(repo, "hash-object", "-w", "--stdin", input=b"dangling").strip()
    git = Git(repo)
    found = dict(git.reachable_blobs())
    for data in (b"committed", b"reflog only", b"stash only", b"stash untracked", b"index only"):
        assert blob_id(repo, data) in found, data
    assert found[blob_id(repo, b"reflog only")] == "keep/m.bin"
    assert found[blob_id(repo, b"index only")] == "keep/staged.bin"
    assert dangling not in found
    only_bin = dict(git.reachable_blobs(lambda p: p.endswith(".bin")))
    assert blob_id(repo, b"t") not in only_bin
    assert blob_id(repo, b"stash untracked") in only_bin


def test_reachable_blobs_odd_paths_and_empty_repo(repo: Path) -> None:
    assert list(Git(repo).reachable_blobs()) == []
    commit(repo, {p: p.encode() + b"!" for p in ODD}, "odd")
    found = {path for _, path in Git(repo).reachable_blobs()}
    # git rev-list --objects prints names only up to the first newline
    assert found == (set(ODD) - {"new\nline.bin"}) | {"new"}


# -- .gitattributes -------------------------------------------------------------------------


def test_attributes_idempotent_and_keeps_other_lines(repo: Path) -> None:
    original = "# mine\n*.png binary\n*.pt filter=lfs diff=lfs merge=lfs -text"
    (repo / ".gitattributes").write_text(original)
    added = attributes.add_patterns(repo, ["*.safetensors", "my models/*.bin", "*.safetensors"])
    assert added == ["*.safetensors", "my models/*.bin"]
    text = (repo / ".gitattributes").read_text()
    assert text.startswith(original + "\n")
    assert '"my models/*.bin" filter=potluck diff=potluck merge=potluck -text\n' in text
    assert attributes.add_patterns(repo, ["*.safetensors", "my models/*.bin"]) == []
    assert (repo / ".gitattributes").read_text() == text
    assert attributes.tracked_patterns(repo) == ["*.safetensors", "my models/*.bin"]
    git = Git(repo)
    assert git.check_attr("filter", "my models/a b.bin") == "potluck"
    assert git.check_attr("diff", "x.safetensors") == "potluck"
    assert git.check_attr("text", "x.safetensors") == "unset"
    assert git.check_attr("filter", "w.pt") == "lfs"
    assert attributes.remove_patterns(repo, ["my models/*.bin", "*.pt"]) == ["my models/*.bin"]
    assert attributes.tracked_patterns(repo) == ["*.safetensors"]
    assert (repo / ".gitattributes").read_text().startswith(original + "\n")
    assert attributes.remove_patterns(repo, ["my models/*.bin"]) == []


def test_attributes_later_line_wins_and_bad_patterns(repo: Path) -> None:
    (repo / ".gitattributes").write_text("*.bin filter=potluck\n*.bin -filter\n")
    assert attributes.tracked_patterns(repo) == []
    assert attributes.add_patterns(repo, ["*.bin"]) == ["*.bin"]
    assert attributes.tracked_patterns(repo) == ["*.bin"]
    for bad in ["", "  ", "!*.bin", "a\nb"]:
        with pytest.raises(UserError):
            attributes.add_patterns(repo, [bad])
    assert attributes.tracked_patterns(Path(repo / "nowhere")) == []


def test_attributes_quoting_round_trip(repo: Path) -> None:
    odd = ['quote"d *.bin', "back\\slash.bin", "#hash.bin"]
    assert attributes.add_patterns(repo, odd) == odd
    assert attributes.tracked_patterns(repo) == odd
    assert Git(repo).check_attr("filter", "#hash.bin") == "potluck"
    assert Git(repo).check_attr("filter", 'quote"d x.bin') == "potluck"


# -- setup ----------------------------------------------------------------------------------


def test_install_idempotent_and_uninstall(repo: Path) -> None:
    git = Git(repo)
    changed = setup.install(git)
    assert set(changed) == set(setup.driver_config())
    assert setup.install(git) == []
    assert git.config_get("filter.potluck.process") == "git-potluck filter-process"
    assert git.config_get("filter.potluck.required") == "true"
    assert git.config_get("merge.potluck.driver") == "git-potluck merge-driver -- %O %A %B %P"
    moved = [k for k, v in setup.driver_config("/opt/pl").items() if "/opt/pl" in v]
    assert setup.install(git, command="/opt/pl") == moved
    assert len(moved) == 6
    removed = setup.uninstall(git)
    assert set(removed) == set(setup.driver_config())
    assert setup.uninstall(git) == []
    assert git.config_get("filter.potluck.process") is None
    assert "potluck" not in (repo / ".git" / "config").read_text()


def test_install_hook(repo: Path) -> None:
    git = Git(repo)
    line = 'git-potluck pre-push-hook "$@"'
    assert setup.install_hook(git, "pre-push", line) is True
    hook = repo / ".git" / "hooks" / "pre-push"
    assert hook.read_text() == f"#!/bin/sh\n{line}\n"
    assert hook.stat().st_mode & stat.S_IXUSR
    assert setup.install_hook(git, "pre-push", line) is False
    assert hook.read_text() == f"#!/bin/sh\n{line}\n"

    lfs = '#!/bin/sh\ngit lfs pre-push "$@"'  # no trailing newline
    post = repo / ".git" / "hooks" / "post-checkout"
    post.write_text(lfs)
    post.chmod(0o750)
    assert setup.install_hook(git, "post-checkout", line) is True
    assert setup.install_hook(git, "post-checkout", line) is False
    assert post.read_text() == f"{lfs}\n{line}\n"
    assert stat.S_IMODE(post.stat().st_mode) == 0o750

    assert setup.uninstall_hook(git, "post-checkout", line) is True
    assert post.read_text() == lfs + "\n"
    assert setup.uninstall_hook(git, "pre-push", line) is True
    assert not hook.exists()
    assert setup.uninstall_hook(git, "pre-push", line) is False


def test_install_hook_respects_hooks_path(repo: Path) -> None:
    sh(repo, "config", "core.hooksPath", "my hooks")
    (repo / "sub").mkdir()
    git = Git(repo / "sub")
    assert setup.install_hook(git, "post-merge", "echo hi") is True
    assert (repo / "my hooks" / "post-merge").read_text() == "#!/bin/sh\necho hi\n"
    assert not (repo / ".git" / "hooks" / "post-merge").exists()
