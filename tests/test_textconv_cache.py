"""Issue 15: the first `git log -p` starts no textconv process per blob.

potluck writes git's textconv cache (refs/notes/textconv/potluck) itself: the filter notes each
manifest it cleans or smudges, `potluck clone` and `potluck textconv --fill-cache` note a whole
history. The reference is git itself: `git log -p` with the cache off (git runs the textconv
command for every blob) must print exactly what the cached run prints.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, model, run_in, save_st
from potluck.git.textconv_cache import NOTES_REF, blob_id
from test_vcs import commit

NAME = "m.safetensors"


def _history(repo: Path, git: Run, rng: np.random.Generator, steps: int = 3) -> list[str]:
    """``steps`` commits of one checkpoint (a tensor changes each time); its blob ids."""
    weights = model(rng, n_layers=2, d=8)
    blobs = []
    for step in range(steps):
        weights["layers.0.b"] = weights["layers.0.b"] + 1
        save_st(repo / NAME, weights)
        commit(git, NAME, f"step {step}")
        blobs.append(git("git", "rev-parse", f"HEAD:{NAME}").strip())
    return blobs


def _log_p(repo: Path, *config: str) -> tuple[str, int]:
    """(`git log -p` output, how many textconv processes it started: from GIT_TRACE)."""
    args = ["git", *(a for c in config for a in ("-c", c)), "log", "-p", "--", NAME]
    env = {**os.environ, "GIT_TRACE": "2"}
    proc = subprocess.run(args, cwd=repo, capture_output=True, env=env, check=True)
    trace = proc.stderr.decode().split("\n")
    started = sum("textconv" in ln and "run_command" in ln for ln in trace)
    return proc.stdout.decode(), started


def _notes(git: Run) -> dict[str, str]:
    listed = git("git", "notes", "--ref", "textconv/potluck", "list").split()
    return dict(zip(listed[1::2], listed[0::2], strict=True))


def test_git_add_fills_the_cache_and_git_log_p_runs_no_textconv(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    blobs = _history(repo, git, rng)
    assert set(_notes(git)) == set(blobs)
    command = git("git", "config", "diff.potluck.textconv").strip()
    assert git("git", "log", "-1", "--format=%s", NOTES_REF).strip() == command
    cached, started = _log_p(repo)
    assert started == 0
    reference, ran = _log_p(repo, "diff.potluck.cachetextconv=false")
    assert ran == 2 * len(blobs) - 1  # git converted each side of each change itself
    assert cached == reference
    assert cached.count("+layers.0.b  F32[8]") == len(blobs)


def test_each_note_is_what_the_textconv_command_prints(
    repo: Path, git: Run, rng: np.random.Generator, tmp_path: Path
) -> None:
    blobs = _history(repo, git, rng, steps=2)
    for blob, note in _notes(git).items():
        manifest = git("git", "cat-file", "blob", blob).encode()
        assert blob_id(manifest) == blob
        (tmp_path / "manifest").write_bytes(manifest)
        printed = subprocess.run(
            ["potluck", "textconv", "--", str(tmp_path / "manifest")],
            cwd=repo, capture_output=True, check=True,
        ).stdout  # fmt: skip
        assert git("git", "cat-file", "blob", note).encode() == printed
    assert len(blobs) == 2


def test_a_cache_made_for_another_command_is_replaced(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    first = _history(repo, git, rng, steps=1)
    git("git", "config", "diff.potluck.textconv", "git-potluck textconv --  ")
    weights = model(rng, n_layers=2, d=8)
    save_st(repo / NAME, weights)
    commit(git, NAME, "other")
    second = git("git", "rev-parse", f"HEAD:{NAME}").strip()
    assert set(_notes(git)) == {second}  # the note made for the old command is gone
    assert git("git", "log", "-1", "--format=%s", NOTES_REF).strip() == "git-potluck textconv --"
    assert first[0] != second


def test_fill_cache_notes_a_cloned_history_and_clone_does_it_itself(
    repo: Path, git: Run, rng: np.random.Generator, tmp_path: Path, hub: Path
) -> None:
    blobs = _history(repo, git, rng)
    git("git", "push", "-q", "origin", "main")
    plain = tmp_path / "plain"
    run_in(tmp_path)("git", "clone", "-q", "--no-checkout", str(hub), str(plain))
    clone = run_in(plain)
    clone("potluck", "init")  # in a clone made with plain git: fills the cache
    assert set(_notes(clone)) == set(blobs)
    clone("git", "update-ref", "-d", NOTES_REF)
    clone("git", "checkout", "-q", "main")
    assert set(_notes(clone)) == {blobs[-1]}  # what the checkout smudged
    out = clone("potluck", "textconv", "--fill-cache", check=False)
    assert "potluck: textconv cache: 2 new notes" in out
    assert set(_notes(clone)) == set(blobs)
    cached, started = _log_p(plain)
    assert started == 0
    assert cached == _log_p(plain, "diff.potluck.cachetextconv=false")[0]
    run_in(tmp_path)("potluck", "clone", str(hub), str(tmp_path / "second"))
    assert set(_notes(run_in(tmp_path / "second"))) == set(blobs)


def test_no_notes_when_the_cache_is_off(repo: Path, git: Run, rng: np.random.Generator) -> None:
    git("git", "config", "diff.potluck.cachetextconv", "false")
    _history(repo, git, rng, steps=1)
    assert git("git", "rev-parse", "--verify", "--quiet", NOTES_REF, check=False).strip() == ""


@pytest.mark.parametrize("args", [[], ["--fill-cache", "x"]])
def test_textconv_wants_a_file_or_fill_cache(repo: Path, args: list[str]) -> None:
    proc = subprocess.run(["potluck", "textconv", *args], cwd=repo, capture_output=True)
    assert proc.returncode == 2
    assert b"give a FILE, or --fill-cache alone" in proc.stderr


@pytest.mark.parametrize(
    ("values", "noted"),
    [(["false", "true"], True), (["true", "false"], False), ([None], True), (["0"], False)],
)
def test_the_cache_switch_is_read_as_git_reads_it(
    repo: Path, git: Run, rng: np.random.Generator, values: list[str | None], noted: bool
) -> None:
    """The last of several values wins, and a key with no value is a true boolean."""
    git("git", "config", "--unset-all", "diff.potluck.cachetextconv")
    config = repo / ".git" / "config"
    lines = "".join(
        "\tcachetextconv\n" if v is None else f"\tcachetextconv = {v}\n" for v in values
    )
    config.write_text(config.read_text() + '[diff "potluck"]\n' + lines)
    blobs = _history(repo, git, rng, steps=1)
    assert set(_notes(git)) == (set(blobs) if noted else set())


def _manifest(git: Run, rng: np.random.Generator, repo: Path, tag: float) -> bytes:
    """A manifest blob's text (cleaned by the filter: ``git add`` of a fresh checkpoint)."""
    weights = model(rng, n_layers=1, d=4)
    weights["layers.0.b"] = weights["layers.0.b"] + tag
    save_st(repo / NAME, weights)
    git("git", "add", NAME)
    return git("git", "cat-file", "blob", f":{NAME}").encode()


def test_notes_prepared_in_the_background_are_committed_once_each(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    """``note`` prepares each manifest's text on the cache's thread; ``flush`` commits one note
    per distinct manifest (a repeated one once), each the text ``render`` gives."""
    from potluck.git.plumbing import Git
    from potluck.git.textconv_cache import TextconvCache
    from potluck.objects.manifest import parse

    texts = [_manifest(git, rng, repo, tag) for tag in (1.0, 2.0)]
    git("git", "update-ref", "-d", NOTES_REF)  # ``git add`` noted them: start with no cache
    cache = TextconvCache(Git(repo), lambda m: ("|".join(m.tensors()) + "\n").encode())
    for text in (*texts, texts[0]):
        cache.note(text, parse(text))
    assert cache.flush() == 2
    notes = _notes(git)
    assert set(notes) == {blob_id(t) for t in texts}
    for text in texts:
        expected = "|".join(parse(text).tensors()) + "\n"
        assert git("git", "cat-file", "blob", notes[blob_id(text)]) == expected
    assert cache.flush() == 0  # nothing noted since


def test_a_note_that_fails_in_the_background_leaves_the_cache_as_it_was(
    repo: Path, git: Run, rng: np.random.Generator, caplog: pytest.LogCaptureFixture
) -> None:
    from potluck.git.plumbing import Git
    from potluck.git.textconv_cache import TextconvCache
    from potluck.objects.manifest import Manifest, parse

    text = _manifest(git, rng, repo, 3.0)
    git("git", "update-ref", "-d", NOTES_REF)

    def broken(m: Manifest) -> bytes:
        raise OSError("disk full")

    cache = TextconvCache(Git(repo), broken)
    cache.note(text, parse(text))
    assert cache.flush() == 0
    assert git("git", "rev-parse", "--verify", "--quiet", NOTES_REF, check=False) == ""
    assert "the textconv cache was not updated (disk full)" in caplog.text
