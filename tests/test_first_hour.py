"""The first hour of a new user (issue 15), end to end on the tiny real layouts.

One scenario per test, each in a fresh repository, with the commands a user types (real git,
the installed ``potluck``/``git-potluck``, a bare repository as the remote): init/track/commit/
diff/checkout, stash/rebase/cherry-pick, ``git merge`` with a TIES rule, push and a partial
clone, ``potluck.load``, mergekit YAML and flag merges, patches, PEFT, experts and compose,
inspecting files outside a repository and the typos. The models are the module fixture of
``test_first_hour_models``: tiny BERTs saved by transformers and the hand-made "original"
(``position_ids`` buffer, sentence-transformers layout).

Minutes under load, so ``heavy``: ``bench/first_hour.sh`` runs it
(``pytest -m heavy tests/test_first_hour.py``).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import potluck
from test_first_hour_models import KEY, POS, QUERY, _safetensors, hf  # noqa: F401 (fixture)

pytestmark = pytest.mark.heavy
ST = "model.safetensors"


def sh(cwd: Path, *args: str | Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    """Run a command in ``cwd``; its exit code must be ``code``."""
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, check=False
    )
    assert proc.returncode == code, f"{args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _new_repo(root: Path, model: Path) -> Path:
    """``root`` as a potluck repository holding ``model`` (an HF directory) under model/."""
    root.mkdir()
    sh(root, "git", "init", "-q", "-b", "main")
    sh(root, "potluck", "init")
    sh(root, "potluck", "track", "*.safetensors")
    shutil.copytree(model, root / "model")
    sh(root, "git", "add", ".")
    sh(root, "git", "commit", "-q", "-m", "the original")
    return root


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


def _with(src: Path, out: Path, **changes: float) -> bytes:
    """``src`` (a safetensors file) written to ``out`` with ``changes[name]`` added to the
    tensors named (``__`` in a keyword stands for ``.``); its bytes."""
    from safetensors.numpy import save_file

    tensors = _safetensors(src)
    for key, delta in changes.items():
        name = key.replace("__", ".")
        tensors[name] = tensors[name] + np.float32(delta)
    save_file(tensors, str(out), metadata={"format": "pt"})
    return out.read_bytes()


Q = QUERY.replace(".", "__")
K = KEY.replace(".", "__")
V = QUERY.replace("query", "value").replace(".", "__")


def test_commit_diff_checkout_stash(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    repo = _new_repo(tmp_path / "r", hf / "orig")
    f = repo / "model" / ST
    v1 = _bytes(f)
    assert sh(repo, "git", "cat-file", "-p", f"HEAD:model/{ST}").stdout.startswith(
        "potluck manifest v1\n"
    )
    v2 = _with(f, f, **{Q: 0.25})
    out = sh(repo, "potluck", "diff").stdout.splitlines()
    assert out[1].split()[:2] == ["changed", QUERY] and len(out) == 3
    assert sh(repo, "git", "diff").stdout.splitlines()[1:] == out[1:]
    sh(repo, "git", "commit", "-q", "-am", "fine-tune")
    sh(repo, "git", "checkout", "-q", "HEAD~1", "--", f"model/{ST}")
    assert _bytes(f) == v1
    sh(repo, "git", "checkout", "-q", "HEAD", "--", f"model/{ST}")
    assert _bytes(f) == v2
    log_p = sh(repo, "git", "log", "-p", "-1", "--format=").stdout
    assert f"+{QUERY}  F32[16,16]" in log_p and f"-{QUERY}  F32[16,16]" in log_p
    v3 = _with(f, f, **{K: 1.0})
    sh(repo, "git", "stash", "-q")
    assert _bytes(f) == v2
    sh(repo, "git", "stash", "pop", "-q")
    assert _bytes(f) == v3
    names = [line.split()[0] for line in sh(repo, "potluck", "ls", f"model/{ST}").stdout.split(
        "\n")[1:] if line.strip()]  # fmt: skip
    assert POS in names and QUERY in names


def test_rebase_and_cherry_pick_combine_tensor_changes(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    repo = _new_repo(tmp_path / "r", hf / "orig")
    f = repo / "model" / ST
    base = _safetensors(f)
    sh(repo, "git", "switch", "-q", "-c", "feature")
    _with(f, f, **{Q: 0.5})
    sh(repo, "git", "commit", "-q", "-am", "query")
    _with(f, f, **{V: 2.0})
    sh(repo, "git", "commit", "-q", "-am", "value")
    value_commit = sh(repo, "git", "rev-parse", "HEAD").stdout.strip()
    sh(repo, "git", "switch", "-q", "main")
    _with(f, f, **{K: 1.0})
    sh(repo, "git", "commit", "-q", "-am", "key")
    sh(repo, "git", "cherry-pick", value_commit)
    got = _safetensors(f)
    assert np.array_equal(got[KEY], base[KEY] + np.float32(1.0))
    assert np.array_equal(got[V.replace("__", ".")], base[V.replace("__", ".")] + np.float32(2))
    assert np.array_equal(got[QUERY], base[QUERY])
    sh(repo, "git", "switch", "-q", "feature")
    sh(repo, "git", "rebase", "-q", "main")  # "value" is already there: only "query" is replayed
    got = _safetensors(f)
    want = {QUERY: base[QUERY] + np.float32(0.5), KEY: base[KEY] + np.float32(1.0)}
    assert all(np.array_equal(got[n], w) for n, w in want.items())
    assert sh(repo, "git", "log", "--format=%s").stdout.split("\n")[:4] == [
        "query", "value", "key", "the original"
    ]  # fmt: skip
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_git_merge_with_a_ties_rule_matches_the_flag_merge(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    repo = _new_repo(tmp_path / "r", hf / "orig")
    rule = {"path": "*.safetensors", "tensors": "*", "method": "ties",
            "params": {"density": 0.5, "lambda_": 1.0}, "seed": 0}  # fmt: skip
    (repo / ".potluck.json").write_text(json.dumps({"merge": [rule]}))
    sh(repo, "git", "add", ".potluck.json")
    sh(repo, "git", "commit", "-q", "-m", "merge rule")
    f = repo / "model" / ST
    shutil.copyfile(f, tmp_path / "base.st")
    sh(repo, "git", "switch", "-q", "-c", "a")
    _with(f, tmp_path / "a.st", **{Q: 0.5, K: -0.25})
    shutil.copyfile(tmp_path / "a.st", f)
    sh(repo, "git", "commit", "-q", "-am", "a")
    sh(repo, "git", "switch", "-q", "main")
    rng = np.random.default_rng(0)
    tensors = _safetensors(f)
    tensors[QUERY] = tensors[QUERY] + rng.normal(0, 0.1, tensors[QUERY].shape).astype(np.float32)
    from safetensors.numpy import save_file

    save_file(tensors, str(f), metadata={"format": "pt"})
    shutil.copyfile(f, tmp_path / "b.st")
    sh(repo, "git", "commit", "-q", "-am", "b")
    sh(repo, "git", "merge", "-q", "--no-edit", "a")
    message = sh(repo, "git", "log", "-1", "--format=%B").stdout
    assert f"Potluck-Merge: model/{ST}: " in message and "ties(" in message
    assert sh(repo, "potluck", "status").stdout == "potluck: nothing to report\n"
    merged = _safetensors(f)
    assert np.array_equal(merged[KEY], _safetensors(tmp_path / "a.st")[KEY])  # one side only
    sh(tmp_path, "potluck", "merge", "--method", "ties", "--base", tmp_path / "base.st",
       tmp_path / "b.st", tmp_path / "a.st", "-o", tmp_path / "flag", "-p", "density=0.5",
       "-p", "lambda_=1.0", "--seed", "0")  # fmt: skip
    flag = _safetensors(next((tmp_path / "flag").glob("*.safetensors")))
    assert not np.array_equal(merged[QUERY], _safetensors(tmp_path / "b.st")[QUERY])
    np.testing.assert_allclose(merged[QUERY], flag[QUERY], rtol=0, atol=1e-6)


def test_push_partial_clone_pull_and_load(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    repo = _new_repo(tmp_path / "r", hf / "orig")
    bare = tmp_path / "hub.git"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", bare)
    sh(repo, "git", "remote", "add", "origin", bare)
    sh(repo, "git", "push", "-q", "origin", "main")
    clone = tmp_path / "c"
    sh(tmp_path, "potluck", "clone", bare, clone, "--include", "*embeddings*")
    f = clone / "model" / ST
    assert _bytes(f).startswith(b"potluck manifest v1\n")  # not all tensors: left a manifest
    want = _safetensors(repo / "model" / ST)
    name = "embeddings.word_embeddings.weight"
    got = potluck.load(str(f), names=[name])
    assert list(got) == [name] and np.array_equal(got[name], want[name])
    status = sh(clone, "potluck", "status").stdout
    assert f"model/{ST}" in status
    sh(clone, "potluck", "pull", "--include", "*")
    assert _bytes(f) == _bytes(repo / "model" / ST)
    assert _bytes(clone / "model" / "modules.json") == _bytes(hf / "orig" / "modules.json")


def test_merges_patches_peft_and_compose(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    w = tmp_path
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(hf / "ft1"), "parameters": {"weight": 0.5}},
                         {"model": str(hf / "ft2"), "parameters": {"weight": 0.5}}]}  # fmt: skip
    (w / "m.yaml").write_text(json.dumps(config))  # JSON is YAML
    sh(w, "potluck", "merge", w / "m.yaml", w / "yaml_out")
    sh(w, "potluck", "merge", "--method", "linear", hf / "ft1", hf / "ft2", "-o", w / "flag_out",
       "--weights", "0.5,0.5", "--dtype", "float32")  # fmt: skip
    assert _bytes(w / "yaml_out" / ST) == _bytes(w / "flag_out" / ST)
    a, b = _safetensors(hf / "ft1" / ST), _safetensors(hf / "ft2" / ST)
    merged = _safetensors(w / "yaml_out" / ST)
    np.testing.assert_allclose(merged[QUERY], (a[QUERY] + b[QUERY]) / 2, rtol=0, atol=1e-7)

    sh(w, "potluck", "patch", "create", hf / "orig", hf / "orig_ft", "-o", w / "ft.patch")
    sh(w, "potluck", "patch", "apply", hf / "orig", w / "ft.patch", "-o", w / "applied")
    assert _bytes(w / "applied" / ST) == _bytes(hf / "orig_ft" / ST)

    sh(w, "potluck", "peft", "export", hf / "q.patch", w / "adapter", "--base-model", "orig")
    sh(w, "potluck", "peft", "apply", hf / "orig", w / "adapter", w / "peft_out")
    sh(w, "potluck", "peft", "import", w / "adapter", "--base", hf / "orig", "-o", w / "back.patch")
    sh(w, "potluck", "patch", "apply", hf / "orig", w / "back.patch", "-o", w / "back_out")
    sh(w, "potluck", "patch", "apply", hf / "orig", hf / "q.patch", "-o", w / "q_out")
    peft_w = _safetensors(w / "peft_out" / ST)
    assert _safetensors(w / "back_out" / ST).keys() == peft_w.keys()
    np.testing.assert_allclose(
        _safetensors(w / "back_out" / ST)[QUERY], peft_w[QUERY], rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(_safetensors(w / "q_out" / ST)[QUERY], peft_w[QUERY], atol=1e-6)

    for name in ("qk", "q"):
        sh(w, "potluck", "experts", "add", hf / f"{name}.patch", "-L", w / "lib", "--name", name,
           "--version", "1.0", "--base", hf / "orig", "--arrow")  # fmt: skip
    listed = sh(w, "potluck", "experts", "list", "-L", w / "lib").stdout
    assert "qk" in listed and "q" in listed
    shutil.copytree(hf / "orig", w / "orig")
    (w / "mix.toml").write_text(
        'base = "orig"\nlibrary = "lib"\nexperts = ["qk", "q"]\n\n[router]\n'
        f'strategy = "arrow"\nlayers = ["{QUERY}"]\n'
    )
    sh(w, "potluck", "compose", "lock", w / "mix.toml")
    info = json.loads(sh(w, "potluck", "compose", "export", w / "mix.lock", "-o", w / "mix.patch",
                         "--json").stdout)  # fmt: skip
    assert info["tensors"] == [QUERY] and info["left_out"] == [KEY]
    sh(w, "potluck", "patch", "apply", hf / "orig", w / "mix.patch", "-o", w / "mixed")
    assert _safetensors(w / "mixed" / ST).keys() == _safetensors(hf / "orig" / ST).keys()


def test_inspecting_files_anywhere_and_typos(hf: Path, tmp_path: Path) -> None:  # noqa: F811
    w = tmp_path / "nowhere"
    w.mkdir()
    listing = sh(w, "potluck", "ls", hf / "orig" / ST).stdout
    assert POS in listing and QUERY in listing
    assert sh(w, "potluck", "ls", hf / "orig").stdout == listing
    diff = sh(w, "potluck", "diff", hf / "orig" / ST, hf / "orig_ft" / ST).stdout.splitlines()
    assert [line.split()[:2] for line in diff if "changed" in line.split()[:1]] == [
        ["changed", QUERY]
    ]
    assert sh(w, "potluck", "diff", hf / "orig", hf / "orig").stdout == ""
    repo = _new_repo(tmp_path / "r", hf / "orig")
    typos: list[tuple[list[str | Path], int, str]] = [
        (["potluck", "diff", "nosuchrev"], 2, "nosuchrev"),
        (["potluck", "diff", "HEAD~99", "HEAD"], 2, "HEAD~99"),
        (["potluck", "log", "nonexist.safetensors"], 2, "nonexist.safetensors"),
        (["potluck", "lss"], 2, "No such command 'lss'"),
        (["potluck", "merge", "--method", "nosuch", hf / "ft1", hf / "ft2", "-o", tmp_path / "x"],
         2, "nosuch"),
        (["potluck", "patch", "apply", hf / "ft1", hf / "q.patch", "-o", tmp_path / "y"], 3,
         "is not the base this patch was made for"),
    ]  # fmt: skip
    for args, code, says in typos:
        proc = sh(repo, *args, code=code)
        assert says in proc.stderr and "Traceback" not in proc.stderr, args
        assert proc.stdout == "", args
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
