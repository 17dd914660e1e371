"""Issue 15 (what was left of items 6 and 10): `git log -p` without rebuilding checkpoints,
and what the CLI does with a closed pipe or control characters in its input.

git smudges every blob it hands to textconv or to the external diff driver. When the git that
started the filter only shows blobs (`git log -p`, `git show`, `git diff`), the filter passes
the manifest through: textconv and the diff driver read manifests themselves, with the same
text as from the checkpoint.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from conftest import Run, model, save_st
from potluck.cli.render import SafeFormatter
from potluck.git.filter import git_command
from test_vcs import commit


def _history(repo: Path, git: Run, rng: np.random.Generator) -> tuple[list[bytes], list[str]]:
    """Two commits of ``m.safetensors``: (file bytes, textconv of each checkpoint)."""
    weights = model(rng, n_layers=1, d=8)
    files, texts = [], []
    for step in range(2):
        weights["layers.0.b"] = weights["layers.0.b"] + 1
        files.append(save_st(repo / "m.safetensors", weights))
        texts.append(git("potluck", "textconv", "--", "m.safetensors"))
        commit(git, "m.safetensors", f"step {step}")
    return files, texts


def test_show_commands_read_manifests_and_checkout_still_rebuilds(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    files, texts = _history(repo, git, rng)
    # git diff between commits: the diff driver reads the manifests' tensors from the store
    out = git("git", "diff", "HEAD~1", "HEAD", "--", "m.safetensors").splitlines()
    assert out[0] == "potluck diff a/m.safetensors b/m.safetensors"
    assert out[1].split()[:3] == ["changed", "layers.0.b", "F32[8]"]
    assert out[2:] == ["  (1 tensors differ, 2 unchanged)"]
    # a checkout still rebuilds the checkpoint, byte for byte
    git("git", "checkout", "-q", "HEAD~1", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == files[0]
    git("git", "checkout", "-q", "HEAD", "--", "m.safetensors")
    assert (repo / "m.safetensors").read_bytes() == files[1]
    # git log -p with no tensor data at all: a smudge would leave manifests and warn on stderr
    git("git", "config", "diff.potluck.cachetextconv", "false")
    shutil.rmtree(repo / ".git" / "potluck" / "objects")
    proc = subprocess.run(
        ["git", "log", "-p", "--format=%s", "--", "m.safetensors"],
        cwd=repo, capture_output=True, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, b"")
    old = texts[0].splitlines()
    new = texts[1].splitlines()
    changed = [(a, b) for a, b in zip(old, new, strict=True) if a != b]
    assert [a.split()[0] for a, _ in changed] == ["layers.0.b"]
    log = proc.stdout.decode()
    assert f"-{changed[0][0]}\n+{changed[0][1]}\n" in log
    assert "".join(f"+{line}\n" for line in old) in log  # the first commit adds every line


def test_git_command_names() -> None:
    assert git_command(["git", "-C", "x", "-c", "a=b", "--no-pager", "log", "-p"]) == "log"
    assert git_command(["/usr/bin/git", "--git-dir", "log", "checkout", "x"]) == "checkout"
    assert git_command(["git", "--git-dir=log", "show"]) == "show"
    assert git_command(["python", "log"]) is None
    assert git_command(["git", "-p"]) is None
    assert git_command([]) is None


# -- a closed pipe, control characters in usage errors ---------------------------------------


def _into_closed_pipe(cwd: Path, *args: str) -> tuple[int, bytes]:
    """``potluck ARGS`` writing into a pipe whose reader has already gone (as after ``| head``
    got its lines): (exit code, stderr)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "potluck", *args],
            cwd=cwd, stdout=write_end, stderr=subprocess.PIPE, check=False,
        )  # fmt: skip
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


def test_ls_log_and_diff_into_a_closed_pipe_exit_0_quietly(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    weights = model(rng, n_layers=2, d=8)
    save_st(repo / "m.safetensors", weights)
    commit(git, "m.safetensors", "v1")
    weights["layers.0.b"] = weights["layers.0.b"] + 1
    save_st(repo / "m.safetensors", weights)
    commit(git, "m.safetensors", "v2")
    for args in (["ls", "m.safetensors"], ["log", "m.safetensors"], ["diff", "HEAD~1", "HEAD"]):
        assert _into_closed_pipe(repo, *args) == (0, b""), args
    first = subprocess.run(
        f"{shlex.quote(sys.executable)} -m potluck ls m.safetensors | head -n 1",
        shell=True, cwd=repo, capture_output=True, check=True,
    )  # fmt: skip
    assert (
        first.stdout.decode().splitlines() == git("potluck", "ls", "m.safetensors").splitlines()[:1]
    )
    assert first.stderr == b""


def test_usage_errors_escape_control_characters(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "potluck", "no\x1b[31msuch\ncommand"],
        cwd=tmp_path, capture_output=True, check=False,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert b"\x1b" not in proc.stderr
    assert b"'no\\x1b[31msuch\\ncommand'" in proc.stderr
    opt = subprocess.run(
        [sys.executable, "-m", "potluck", "ls", "--bad\x07opt"],
        cwd=tmp_path, capture_output=True, check=False,
    )  # fmt: skip
    assert opt.returncode == 2
    assert b"\x07" not in opt.stderr and b"--bad\\x07opt" in opt.stderr


def test_filter_log_lines_escape_a_newline_in_the_path(repo: Path, git: Run) -> None:
    (repo / "bad\nname.safetensors").write_bytes(b"\xff" * 64)  # not a checkpoint
    proc = subprocess.run(
        ["git", "add", "bad\nname.safetensors"], cwd=repo, capture_output=True, check=False
    )
    assert proc.returncode == 128
    lines = proc.stderr.decode().splitlines()
    assert lines[:3] == [  # then git's own "fatal:" line, which shows the newline as it is
        "potluck clean failed for bad\\nname.safetensors: bad\\nname.safetensors: safetensors: "
        "header length 18446744073709551615 is larger than the 100000000-byte limit",
        "hint: the file is corrupt or not a safetensors file",
        "fatal: bad",
    ]
    assert git("git", "status", "--porcelain") == '?? "bad\\nname.safetensors"\n'


def test_log_records_escape_newlines_in_their_arguments() -> None:
    record = logging.LogRecord(
        "potluck", logging.WARNING, __file__, 1, "%s left as a manifest: %d of %d objects\n%s",
        ("a\nb.safetensors", 1, 2, ValueError("x\ny")), None,
    )  # fmt: skip
    text = SafeFormatter("potluck: %(message)s").format(record)
    assert text == "potluck: a\\nb.safetensors left as a manifest: 1 of 2 objects\nx\ny"


def test_version_is_the_installed_metadatas(tmp_path: Path) -> None:
    from importlib.metadata import version

    for prog in ("potluck", "git-potluck"):
        out = subprocess.run([prog, "--version"], cwd=tmp_path, capture_output=True, check=True)
        assert out.stdout.decode() == f"potluck, version {version('potluck')}\n"
