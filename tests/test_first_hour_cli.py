"""Issue 15, items 6 and 10 (CLI part): what a new user meets in the first hour.

Start-up imports (the deterministic side of latency; times are in bench.startup), the textconv
cache for `git log -p`, `potluck status` exit codes during a real conflict, `potluck track`
next to a git-lfs line in a Hugging Face clone and `--migrate` with real git-lfs, and the CLI
reference naming every command.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import potluck
from conftest import Run, model, run_in, save_st
from potluck.cli.main import LAZY_COMMANDS, cli
from potluck.errors import UserError
from potluck.tensors import dtypes
from test_vcs import commit

ROOT = Path(__file__).resolve().parent.parent
#: What neither `potluck --version` nor git's filter process may import at start-up.
NEVER_AT_START = ("ml_dtypes", "rich", "httpx", "torch", "transformers", "yaml", "fsspec")
HANDSHAKE = b"".join(
    b"%04x" % (len(line) + 5) + line + b"\n" if line else b"0000"
    for line in [b"git-filter-client", b"version=2", b"", b"capability=clean",
                 b"capability=smudge", b""]
)  # fmt: skip
#: The .gitattributes of a Hugging Face model repository (the lines that matter here).
HF_ATTRIBUTES = (
    "*.bin filter=lfs diff=lfs merge=lfs -text\n"
    "*.h5 filter=lfs diff=lfs merge=lfs -text\n"
    "*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
    "*tfevents* filter=lfs diff=lfs merge=lfs -text\n"
)
needs_lfs = pytest.mark.skipif(shutil.which("git-lfs") is None, reason="git-lfs not installed")


def _imported(cwd: Path, *args: str, stdin: bytes = b"") -> set[str]:
    """Modules ``python -m potluck ARGS`` imports (``-X importtime``); it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "potluck", *args],
        cwd=cwd, input=stdin, capture_output=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    lines = proc.stderr.decode().splitlines()
    return {ln.rsplit("|", 1)[1].strip() for ln in lines if ln.startswith("import time:")}


# -- item 6: start-up -------------------------------------------------------------------------


def test_version_imports_neither_numpy_nor_any_subcommand(tmp_path: Path) -> None:
    mods = _imported(tmp_path, "--version")
    # the version number is read from the installed METADATA file, without importlib.metadata
    assert [m for m in (*NEVER_AT_START, "numpy", "importlib.metadata") if m in mods] == []
    assert sorted(m for m in mods if m.startswith("potluck.")) == [
        "potluck.cli", "potluck.cli.main", "potluck.cli.render", "potluck.errors"
    ]  # fmt: skip


def test_filter_process_starts_without_ml_dtypes_or_the_other_commands(repo: Path) -> None:
    mods = _imported(repo, "filter-process", stdin=HANDSHAKE)
    assert [m for m in (*NEVER_AT_START, "importlib.metadata") if m in mods] == []
    # numpy, zstandard and the object store load with the first clean or smudge, the remote
    # code with the first object a smudge must fetch
    deferred = ("numpy", "zstandard", "potluck.ops.vcs", "potluck.git.sync", "potluck.remote")
    assert [m for m in deferred if m in mods] == []
    unused = ("potluck.cli.commands", "potluck.cli.merge_cmd", "potluck.ops.merge")
    assert [m for m in unused if m in mods] == []


def test_every_command_is_mapped_to_the_module_that_registers_it() -> None:
    for module in sorted(set(LAZY_COMMANDS.values())):
        importlib.import_module(f"potluck.cli.{module}")
    where = {name: cmd.callback.__module__ for name, cmd in cli.commands.items() if cmd.callback}
    assert {n: f"potluck.cli.{LAZY_COMMANDS.get(n)}" for n in where} == where
    assert sorted(where) == sorted(LAZY_COMMANDS)


def test_ml_dtypes_loads_only_for_a_dtype_numpy_lacks() -> None:
    code = (
        "import sys, numpy as np\n"
        "from potluck.tensors import dtypes as d\n"
        "a = d.array_from_bytes(np.arange(3, dtype='<f4').tobytes(), 'F32', (3,))\n"
        "print(d.from_numpy(a.dtype), d.itemsize('I64'), d.grouping_size('C128'),"
        " 'ml_dtypes' in sys.modules)\n"
        "print(d.to_numpy('BF16').name, 'ml_dtypes' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout == "F32 8 1 False\nbfloat16 True\n"


def test_dtype_functions_keep_their_results() -> None:
    assert dtypes.dtype_names() == sorted(
        ["BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64", "C64",
         "C128", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0"]
    )  # fmt: skip
    assert dtypes.to_numpy("F8_E4M3") == np.dtype(ml_dtypes.float8_e4m3fn)
    assert dtypes.from_numpy(np.dtype(ml_dtypes.bfloat16)) == "BF16"
    assert dtypes.from_numpy(np.dtype(">f4")) == "F32"
    assert [dtypes.itemsize(n) for n in ("BF16", "F8_E8M0", "C128")] == [2, 1, 16]
    assert dtypes.grouping_size("NOPE") == 1
    bf = dtypes.array_from_bytes(b"\x80\x3f\x00\x40", "BF16", (2,))
    assert bf.astype(np.float32).tolist() == [1.0, 2.0]
    with pytest.raises(UserError) as e:
        dtypes.to_numpy("F4")
    assert e.value.message == "unknown dtype 'F4'"
    with pytest.raises(UserError) as e:
        dtypes.from_numpy(np.dtype("V3"))
    assert e.value.message == "dtype |V3 is not supported"


def test_init_turns_on_the_textconv_cache_and_git_log_p_fills_it(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    git("git", "config", "--unset", "diff.potluck.cachetextconv")  # as an older potluck left it
    assert git("potluck", "init").endswith("(1 settings)\n")
    assert git("git", "config", "diff.potluck.cachetextconv") == "true\n"
    weights = model(rng, n_layers=1, d=8)
    blobs = set()
    for step in range(2):
        weights["layers.0.b"] = weights["layers.0.b"] + 1
        save_st(repo / "m.safetensors", weights)
        commit(git, "m.safetensors", f"step {step}")
        blobs.add(git("git", "rev-parse", "HEAD:m.safetensors").strip())
    log = git("git", "log", "-p", "--", "m.safetensors")
    assert log.count("+layers.0.b  F32[8]") == 2
    listed = git("git", "notes", "--ref", "textconv/potluck", "list").split()
    assert set(listed[1::2]) == blobs  # one cached conversion per manifest blob


# -- item 10: status exit code during a real merge conflict ----------------------------------


def test_status_exits_1_during_a_conflict_and_0_once_resolved(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    base = model(rng, n_layers=1, d=8)
    save_st(repo / "m.safetensors", base)
    commit(git, "m.safetensors", "base")
    git("git", "switch", "-q", "-c", "theirs")
    save_st(repo / "m.safetensors", dict(base, **{"layers.0.w": np.full((8, 8), 2, np.float32)}))
    commit(git, "m.safetensors", "theirs")
    git("git", "switch", "-q", "main")
    save_st(repo / "m.safetensors", dict(base, **{"layers.0.w": np.full((8, 8), 1, np.float32)}))
    commit(git, "m.safetensors", "ours")
    assert "CONFLICT" in git("git", "merge", "--no-edit", "theirs", check=False)
    for args in (("potluck", "status"), ("potluck", "status", "--json")):
        proc = subprocess.run(args, cwd=repo, capture_output=True, text=True, check=False)
        assert (proc.returncode, proc.stderr) == (1, "")
    assert json.loads(proc.stdout)["conflicts"][0]["tensors"] == ["layers.0.w"]
    git("potluck", "resolve", "m.safetensors", "--take", "ours")
    assert git("potluck", "status") == "potluck: nothing to report\n"


# -- item 10: track next to git-lfs ----------------------------------------------------------


def _hf_model(rng: np.random.Generator, scale: float) -> dict[str, np.ndarray]:
    """A BERT-shaped state dict (the names transformers writes), tiny."""
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.0.output.dense.weight", "pooler.dense.weight"]  # fmt: skip
    return {n: (scale * rng.standard_normal((8, 8))).astype(np.float32) for n in names}


def _hf_clone(tmp_path: Path, rng: np.random.Generator, pull: bool) -> tuple[Path, list[bytes]]:
    """A git-lfs model repository as on the Hugging Face hub (two commits of
    model.safetensors plus config.json) and a clone of it, its LFS files downloaded when
    ``pull`` (else pointers, as after ``GIT_LFS_SKIP_SMUDGE=1 git clone``); potluck initialised
    in the clone. (clone, file bytes per commit)."""
    hub = tmp_path / "hub"
    hub.mkdir()
    run = run_in(hub)
    run("git", "init", "-q", "-b", "main")
    run("git", "lfs", "install", "--local")
    (hub / ".gitattributes").write_text(HF_ATTRIBUTES)
    (hub / "config.json").write_text('{"model_type": "bert", "hidden_size": 8}\n')
    versions = []
    for step in range(2):
        versions.append(save_st(hub / "model.safetensors", _hf_model(rng, 1.0 + step)))
        run("git", "add", ".")
        run("git", "commit", "-q", "-m", f"upload {step}")
    clone = tmp_path / "clone"
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1"}
    subprocess.run(["git", "clone", "-q", str(hub), str(clone)], env=env, check=True)
    run_in(clone)("git", "lfs", "install", "--local")
    if pull:
        run_in(clone)("git", "lfs", "pull")
    run_in(clone)("potluck", "init")
    return clone, versions


@pytest.fixture
def hf_clone(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, list[bytes]]:
    """``_hf_clone`` with the LFS files downloaded."""
    return _hf_clone(tmp_path, rng, pull=True)


@needs_lfs
def test_track_refuses_to_shadow_a_git_lfs_line(hf_clone: tuple[Path, list[bytes]]) -> None:
    clone, _ = hf_clone
    proc = subprocess.run(["potluck", "track", "*.safetensors"], cwd=clone, capture_output=True,
                          text=True, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "potluck: error: *.safetensors is tracked by git-lfs (a filter=lfs line in "
        ".gitattributes); a potluck line would shadow it while the index still holds LFS "
        "pointers",
        "hint: `potluck track --migrate PATTERN…` rewrites the line to potluck's filter and "
        "re-adds the files (then `git commit`); see docs/cli.md, 'Moving from git-lfs'",
    ]
    assert (clone / ".gitattributes").read_text() == HF_ATTRIBUTES
    assert run_in(clone)("git", "status", "--porcelain") == ""


@needs_lfs
def test_track_migrate_moves_an_hf_clone_to_potluck_keeping_history(
    hf_clone: tuple[Path, list[bytes]],
) -> None:
    clone, versions = hf_clone
    git = run_in(clone)
    out = git("potluck", "track", "--migrate", "*.safetensors")
    assert out.splitlines() == [
        "tracking *.safetensors (its filter=lfs line now routes it through potluck)",
        "re-added model.safetensors: an LFS pointer before, a potluck manifest now",
        "staged; `git commit` to finish (older commits keep their LFS pointers and still check "
        "out through git-lfs)",
    ]
    assert (clone / ".gitattributes").read_text() == HF_ATTRIBUTES.replace(
        "*.safetensors filter=lfs diff=lfs merge=lfs",
        "*.safetensors filter=potluck diff=potluck merge=potluck",
    )
    assert git("git", "status", "--porcelain") == "M  .gitattributes\nM  model.safetensors\n"
    git("git", "commit", "-q", "-m", "move to potluck")
    assert git("git", "show", "HEAD:model.safetensors").startswith("potluck manifest v1\n")
    assert (clone / "model.safetensors").read_bytes() == versions[1]
    got = potluck.load(str(clone / "model.safetensors"), rev="HEAD")
    assert got["pooler.dense.weight"].shape == (8, 8)
    # the LFS history still checks out through git-lfs, and `git log -p` reads across it
    git("git", "checkout", "-q", "HEAD~2")
    assert (clone / "model.safetensors").read_bytes() == versions[0]
    git("git", "checkout", "-q", "main")
    assert (clone / "model.safetensors").read_bytes() == versions[1]
    assert git("git", "status", "--porcelain") == ""
    log = git("git", "log", "-p", "--format=%s", "--", "model.safetensors")
    assert "-version https://git-lfs.github.com/spec/v1\n" in log
    assert "+pooler.dense.weight  F32[8,8]" in log


@needs_lfs
def test_track_migrate_refuses_a_file_never_pulled(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    clone, _ = _hf_clone(tmp_path, rng, pull=False)
    pointer = run_in(clone)("git", "show", "HEAD:model.safetensors").encode()
    assert (clone / "model.safetensors").read_bytes() == pointer
    proc = subprocess.run(["potluck", "track", "--migrate", "*.safetensors"], cwd=clone,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "potluck: error: model.safetensors: only the git-lfs pointer is here (the data was "
        "never downloaded)",
        "hint: `git lfs pull --include='model.safetensors'` downloads it; then run this again",
    ]
    assert (clone / ".gitattributes").read_text() == HF_ATTRIBUTES
    assert run_in(clone)("git", "status", "--porcelain") == ""


@needs_lfs
def test_track_migrate_refuses_local_changes(
    hf_clone: tuple[Path, list[bytes]], rng: np.random.Generator
) -> None:
    clone, _ = hf_clone
    mine = save_st(clone / "model.safetensors", _hf_model(rng, 5.0))
    proc = subprocess.run(["potluck", "track", "--migrate", "*.safetensors"], cwd=clone,
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("potluck: error: model.safetensors has changes not staged\n")
    assert (clone / ".gitattributes").read_text() == HF_ATTRIBUTES
    assert (clone / "model.safetensors").read_bytes() == mine


# -- item 10: the CLI reference names every command ------------------------------------------


def test_cli_reference_names_every_command() -> None:
    for module in sorted(set(LAZY_COMMANDS.values())):
        importlib.import_module(f"potluck.cli.{module}")
    doc = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    missing = []
    for name, cmd in sorted(cli.commands.items()):
        shown = f"`{name}" if cmd.hidden else f"`potluck {name}"  # hidden: the ones git runs
        if re.search(rf"{re.escape(shown)}[ `]", doc) is None:
            missing.append(name)
    assert missing == []
