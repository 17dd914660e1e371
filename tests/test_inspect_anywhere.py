"""Typos in `diff`/`log` are errors; `ls` and `diff` work on files and HF directories anywhere
(issue 15 items 4 and 5), through the real CLI in real git repositories."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from conftest import Run, run_in, save_st
from test_vcs import commit


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["potluck", *args], cwd=cwd, capture_output=True, text=True)


def _tensors(shift: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "a": np.arange(6, dtype=np.float32).reshape(2, 3) + shift,
        "b": np.arange(5, dtype=np.int64),
    }


def test_typo_revisions_and_paths_are_errors(repo: Path, git: Run) -> None:
    save_st(repo / "m.safetensors", _tensors())
    commit(git, "m.safetensors", "v1")
    save_st(repo / "m.safetensors", _tensors(1.0))
    commit(git, "m.safetensors", "v2")
    for args, named in (
        (("diff", "nosuchrev"), "nosuchrev"),
        (("diff", "HEAD~99", "HEAD"), "HEAD~99"),
        (("log", "nonexist.safetensors"), "nonexist.safetensors"),
    ):
        r = _cli(repo, *args)
        assert (r.returncode, r.stdout) == (2, ""), args
        assert named in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _cli(repo, "diff", "HEAD~99")
    assert r.returncode == 2 and "HEAD~99: unknown revision or path" in r.stderr
    # a real path without changes in the range is not a typo: nothing, exit 0
    assert git("potluck", "diff", "HEAD", "--", "m.safetensors") == ""
    assert git("potluck", "diff", "HEAD~1", "HEAD~1", "m.safetensors") == ""
    # a path only in history (deleted since) is still a path
    git("git", "rm", "-q", "m.safetensors")
    git("git", "commit", "-q", "-m", "rm")
    out = json.loads(git("potluck", "diff", "HEAD~2", "HEAD~1", "m.safetensors", "--json"))
    assert [d["path"] for d in out] == ["m.safetensors"]
    assert len(json.loads(git("potluck", "log", "m.safetensors", "--json"))) == 3


def _hf_dir(root: Path, shift: float) -> Path:
    """A two-shard HF layout (index + shards) holding ``_tensors(shift)``."""
    root.mkdir()
    t = _tensors(shift)
    save_st(root / "model-00001-of-00002.safetensors", {"a": t["a"]})
    save_st(root / "model-00002-of-00002.safetensors", {"b": t["b"]})
    index = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return root


ROWS = [
    {"name": "a", "dtype": "F32", "shape": [2, 3], "bytes": 24},
    {"name": "b", "dtype": "I64", "shape": [5], "bytes": 40},
]


def test_ls_and_diff_outside_a_repository(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    out.mkdir()
    save_st(out / "a.safetensors", _tensors())
    save_st(out / "b.safetensors", _tensors(0.5))
    run = run_in(out)
    assert json.loads(run("potluck", "ls", "a.safetensors", "--json")) == ROWS
    assert "2 tensors, 64 B" in run("potluck", "ls", "a.safetensors")
    _hf_dir(out / "base", 0.0)
    _hf_dir(out / "tuned", 0.5)
    assert json.loads(run("potluck", "ls", "base", "--json")) == ROWS
    for a, b in (("a.safetensors", "b.safetensors"), ("base", "tuned")):
        d = json.loads(run("potluck", "diff", a, b, "--json"))
        assert [x["path"] for x in d] == [f"{a} -> {b}"] and d[0]["unchanged"] == 1
        (change,) = d[0]["changes"]
        assert (change["name"], change["status"]) == ("a", "changed")
        assert np.isclose(change["stats"]["l2"], np.sqrt(6 * 0.25), rtol=1e-12)
        assert change["stats"]["frac_changed"] == 1.0
        assert f"potluck diff a/{a} -> {b}" in run("potluck", "diff", a, b)
    assert run("potluck", "diff", "base", "base") == ""  # same tensors: nothing, exit 0
    r = _cli(out, "diff", "base", "a.safetensors")
    assert r.returncode == 2 and "one is a directory" in r.stderr
    r = _cli(out, "diff", "a.safetensors", "typo.safetensors")
    assert r.returncode == 2 and "typo.safetensors: no such file" in r.stderr
    r = _cli(out, "diff", "nosuchrev")
    assert r.returncode == 2 and "not in a git repository" in r.stderr


def test_diff_with_a_path_outside_the_repository(repo: Path, git: Run, tmp_path: Path) -> None:
    save_st(repo / "m.safetensors", _tensors())
    commit(git, "m.safetensors", "v1")
    save_st(tmp_path / "merged.safetensors", _tensors(0.5))
    d = json.loads(
        git("potluck", "diff", "m.safetensors", str(tmp_path / "merged.safetensors"), "--json")
    )
    assert [c["name"] for c in d[0]["changes"]] == ["a"]
    assert json.loads(git("potluck", "ls", str(tmp_path / "merged.safetensors"), "--json")) == ROWS
    # inside the repository two work-tree paths keep git's meaning; --no-index compares them
    save_st(repo / "n.safetensors", _tensors(0.5))
    assert git("potluck", "diff", "m.safetensors", "n.safetensors") == ""
    d = json.loads(git("potluck", "diff", "--no-index", "m.safetensors", "n.safetensors", "--json"))
    assert d[0]["path"] == "m.safetensors -> n.safetensors"


def test_patch_apply_at_rev_keeps_metadata(repo: Path, git: Run, tmp_path: Path) -> None:
    meta = {"format": "pt"}
    save_st(repo / "m.safetensors", _tensors(), metadata=meta)
    commit(git, "m.safetensors", "base")
    target = save_st(repo / "m.safetensors", _tensors(0.5), metadata=meta)
    commit(git, "m.safetensors", "tuned")
    patch, out = tmp_path / "p.safetensors", tmp_path / "out.safetensors"
    git("potluck", "patch", "create", "m.safetensors@HEAD~1", "m.safetensors", "-o", str(patch))
    git("potluck", "patch", "apply", "m.safetensors@HEAD~1", str(patch), "-o", str(out))
    assert out.read_bytes() == target


def test_patch_apply_dir_at_rev_keeps_sentence_transformers_modules(
    repo: Path, git: Run, tmp_path: Path
) -> None:
    st = repo / "st"
    st.mkdir()
    save_st(st / "model.safetensors", _tensors(), metadata={"format": "pt"})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"},
    ]
    (st / "modules.json").write_text(json.dumps(modules))
    (st / "config.json").write_text('{"model_type": "bert"}')
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    commit(git, "st", "base")
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    save_st(tuned / "model.safetensors", _tensors(0.5), metadata={"format": "pt"})
    patch, out = tmp_path / "p.safetensors", tmp_path / "out"
    git("potluck", "patch", "create", "st", str(tuned), "-o", str(patch))
    git("potluck", "patch", "apply", "st@HEAD", str(patch), "-o", str(out))
    assert (out / "1_Pooling" / "config.json").read_bytes() == (
        st / "1_Pooling" / "config.json"
    ).read_bytes()
    assert (out / "modules.json").read_bytes() == (st / "modules.json").read_bytes()
    assert (out / "model.safetensors").read_bytes() == (tuned / "model.safetensors").read_bytes()
