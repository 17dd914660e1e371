"""Hostile checkpoint files (issue 14, items 5, 9, 10, 17): every one ends in a clear
``PotluckError`` naming the file (and tensor), or a bounded result, never a traceback, a hang or
an allocation the file's size does not justify.

Files that made potluck hang, grow without bound or crash the interpreter are read in a child
process under ``RLIMIT_AS`` and a timeout (``bounded``), so a regression fails in seconds
instead of eating the machine. The unit-level files share one such child (``probe``).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import struct
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from potluck.cli.main import cli
from potluck.formats.safetensors import build_header

#: Address space of a child: potluck needs ~200 MB; the DAG bomb grew 3 GB in 60 s.
LIMIT_AS = 1 << 30
LIMIT_S = 60
EXPANDED = "tensor 'w' is a view of 4 bytes (storage 'storage:0') that would expand to "
EXPANDED += "400000000000 bytes (shape [100000000000], stride [0])"
CODE_EXECUTION = (
    "pickle needs code execution: posix.system; potluck loads only weights "
    "(like torch.load(weights_only=True))"
)


def bounded(
    args: list[str], cwd: Path, timeout: float = LIMIT_S
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` (and every child, e.g. git's filter) under ``LIMIT_AS`` and ``timeout``."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (LIMIT_AS, LIMIT_AS))

    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, preexec_fn=limit, env=env
    )


# ----------------------------------------------------------------------------- hostile files


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def with_pickle(data_pkl: bytes) -> bytes:
    """A real ``torch.save`` archive whose ``data.pkl`` is replaced by ``data_pkl``."""
    src = zipfile.ZipFile(io.BytesIO(saved({"a": torch.zeros(2)})))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            dst.writestr(
                info.filename, data_pkl if info.filename.endswith("/data.pkl") else content
            )
    return out.getvalue()


def dag_bomb() -> bytes:
    """``x = [t, t]`` nested 40 times: 2**41 paths to one tensor, 1.8 KB on disk."""
    x: object = torch.ones(2)
    for _ in range(40):
        x = [x, x]
    return saved(x)


def tuple_key_bomb() -> bytes:
    """A dict key that is a shared tuple nested 40 times: hashing it takes 2**40 steps."""
    key: tuple[object, ...] = ()
    for _ in range(40):
        key = (key, key)
    body = pickle.dumps(key, protocol=2)[2:-1]  # not via a dict: building it would hash the key
    return with_pickle(b"\x80\x02}" + body + b"K\x01s.")


def deep_tuple_key() -> bytes:
    """A dict key nested 200 000 deep: hashing it overflowed the C stack (segfault)."""
    return with_pickle(b"\x80\x02}" + b")" + b"\x85" * 200_000 + b"K\x01s.")


def storage_class_build() -> bytes:
    """``BUILD`` on the ``torch.FloatStorage`` stand-in: rewrote potluck's allowlist for the
    rest of the process (every later float32 tensor read as int8)."""
    return with_pickle(
        b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x02\x00\x00\x00I8sb."
    )


def long_name() -> bytes:
    """A 30 000-character key shared by three nesting levels: a 90 000-character name."""
    key = "k" * 30_000
    return saved({key: {key: {key: torch.ones(1)}}})


def expanded_view() -> bytes:
    """``torch.ones(1).expand(10**11)``: 4 bytes of storage, 373 GiB as an array."""
    return saved({"w": torch.ones(1).expand(10**11)})


def safetensors_blob(header_json: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header_json)) + header_json + data


HOSTILE: dict[str, Callable[[], bytes]] = {
    "dag.pt": dag_bomb,
    "keybomb.pt": tuple_key_bomb,
    "deepkey.pt": deep_tuple_key,
    "build.pt": storage_class_build,
    "plain.pt": lambda: saved({"x": torch.arange(3.0)}),  # read after build.pt
    "longname.pt": long_name,
    "expand.pt": expanded_view,
    "deep.safetensors": lambda: safetensors_blob(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
    "bigint.safetensors": lambda: safetensors_blob(
        b'{"a":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,0]}}'
    ),
    "hugeshape.safetensors": lambda: safetensors_blob(
        b'{"a":{"dtype":"F32","shape":[0,1180591620717411303424],"data_offsets":[0,0]}}'
    ),
}

#: Runs in the child: scan each file (and load every tensor of those marked ``+``), printing
#: one JSON line per file as soon as it is done.
PROBE = """
import json, sys
import potluck
from potluck.errors import PotluckError
from potluck.formats import scan_file
for arg in sys.argv[1:]:
    path = arg.lstrip("+")
    try:
        layout = scan_file(path)
        names = [s.name for s in layout.tensor_segments()] + [v.name for v in layout.views]
        res = {"names": names, "dtypes": [s.dtype for s in layout.tensor_segments()]}
        if arg.startswith("+"):
            res["loaded"] = sorted(potluck.load(path))
    except PotluckError as e:
        res = {"error": type(e).__name__, "message": e.message}
    print(json.dumps({path: res}), flush=True)
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A potluck repository (``*.pt`` tracked) whose work tree holds every hostile file."""
    root = tmp_path_factory.mktemp("hostile")
    subprocess.run(["git", "init", "-q", "-b", "main", str(root)], check=True)
    in_dir(root, ["init"], ["track", "*.pt"])
    for name, build in HOSTILE.items():
        (root / name).write_bytes(build())
    return root


def in_dir(cwd: Path, *commands: list[str]) -> list[tuple[int, str]]:
    """``(exit code, output)`` of potluck ``commands`` run in-process in ``cwd``."""
    here = Path.cwd()
    os.chdir(cwd)
    try:
        return [
            (r.exit_code, r.output)
            for r in map(CliRunner().invoke, [cli] * len(commands), commands)
        ]
    finally:
        os.chdir(here)


@pytest.fixture(scope="module")
def probe(hostile: Path) -> dict[str, dict[str, Any]]:
    """What the child process made of each hostile file (one child for all of them)."""
    args = [*HOSTILE]
    args[args.index("expand.pt")] = "+expand.pt"
    args[args.index("plain.pt")] = "+plain.pt"
    r = bounded([sys.executable, "-c", PROBE, *args], hostile)
    results: dict[str, dict[str, Any]] = {}
    for line in r.stdout.splitlines():
        results.update(json.loads(line))
    for name in HOSTILE:  # a file the child died on (a crash, the memory limit) and the rest
        results.setdefault(name, {"child died": r.returncode, "stderr": r.stderr[-2000:]})
    return results


def test_dag_bomb_names_each_shared_container_once(probe: dict[str, dict[str, Any]]) -> None:
    deepest = ".".join(["0"] * 39)
    assert probe["dag.pt"] == {
        "names": ["storage:0", f"{deepest}.0", f"{deepest}.1"],
        "dtypes": ["F32"],
    }


def test_hashing_bombs_in_dict_keys_are_refused(probe: dict[str, dict[str, Any]]) -> None:
    hint = (
        "as a dict key or set item; potluck reads keys that are strings, bytes, integers "
        "below 2**61 or small tuples of strings"
    )
    assert probe["keybomb.pt"] == {
        "error": "FormatError",
        "message": f"keybomb.pt: pytorch: data.pkl uses <tuple of 2 items> {hint}",
    }
    assert probe["deepkey.pt"] == {
        "error": "FormatError",
        "message": f"deepkey.pt: pytorch: data.pkl uses <tuple of 1 items> {hint}",
    }


def test_build_cannot_rewrite_the_allowlist(probe: dict[str, dict[str, Any]]) -> None:
    assert probe["build.pt"] == {
        "error": "FormatError",
        "message": "build.pt: pytorch: data.pkl sets the state of a StorageType; potluck only "
        "restores an OrderedDict's attributes (like torch.load(weights_only=True))",
    }
    assert probe["plain.pt"] == {"names": ["x"], "dtypes": ["F32"], "loaded": ["x"]}


def test_names_are_bounded(probe: dict[str, dict[str, Any]]) -> None:
    assert probe["longname.pt"] == {
        "error": "FormatError",
        "message": "longname.pt: pytorch: a tensor name in data.pkl is longer than 65536 "
        "characters",
    }


def test_expanded_view_is_refused_when_loaded(
    hostile: Path, probe: dict[str, dict[str, Any]]
) -> None:
    """``potluck.load`` printed ``_ArrayMemoryError … 373 GiB``; ``scan`` (``git add``) is fine:
    the view is only refused when copied out."""
    message = f"{hostile / 'expand.pt'}: {EXPANDED}"
    assert probe["expand.pt"] == {"error": "FormatError", "message": message}


def test_safetensors_headers_nested_or_oversized(probe: dict[str, dict[str, Any]]) -> None:
    assert probe["deep.safetensors"] == {
        "error": "FormatError",
        "message": "deep.safetensors: safetensors: header is nested too deeply to be a "
        "safetensors header (a flat map of tensor entries)",
    }
    assert probe["bigint.safetensors"]["message"].startswith(
        "bigint.safetensors: safetensors: header is not valid UTF-8 JSON (Exceeds the limit "
    )
    assert probe["hugeshape.safetensors"] == {
        "error": "FormatError",
        "message": "hugeshape.safetensors: safetensors: tensor 'a' has an impossible shape "
        "(2 dimensions, more than 2**56 elements)",
    }


# ----------------------------------------------------------------------------- real git + CLI


def test_dag_bomb_add_ls_checkout(hostile: Path) -> None:
    """``git add`` and ``potluck ls`` grew to 3 GB in 60 s; now both take milliseconds of work
    and the file comes back byte for byte."""
    blob = (hostile / "dag.pt").read_bytes()
    add = bounded(["git", "add", "dag.pt"], hostile)
    assert (add.returncode, add.stderr) == (0, "")
    subprocess.run(["git", "commit", "-q", "-m", "dag"], cwd=hostile, check=True)
    [(code, out)] = in_dir(hostile, ["ls", "--json", "dag.pt"])
    assert code == 0, out
    deepest = ".".join(["0"] * 39)
    assert [(r["name"], r.get("note")) for r in json.loads(out)] == [
        ("storage:0", None),
        (f"{deepest}.0", "view of storage:0"),
        (f"{deepest}.1", "view of storage:0"),
    ]
    (hostile / "dag.pt").unlink()
    checkout = bounded(["git", "checkout", "--", "dag.pt"], hostile)
    assert (checkout.returncode, checkout.stderr) == (0, "")
    assert (hostile / "dag.pt").read_bytes() == blob


#: Runs in a bounded child: the CLI commands in argv (JSON), printing exit code and output.
CLI = """
import json, sys
from click.testing import CliRunner
from potluck.cli.main import cli
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(cli, args)
    print(json.dumps([r.exit_code, r.output]), flush=True)
"""


def test_expanded_view_merge_and_patch_create(hostile: Path, tmp_path: Path) -> None:
    """Both printed ``_ArrayMemoryError … 373 GiB`` tracebacks."""
    (tmp_path / "a.pt").write_bytes((hostile / "expand.pt").read_bytes())
    commands = [
        ["merge", "--method", "linear", "a.pt", "a.pt", "-o", "out"],
        ["patch", "create", "a.pt", "a.pt", "-o", "p.patch"],
    ]
    r = bounded([sys.executable, "-c", CLI, json.dumps(commands)], tmp_path)
    hint = (
        "hint: re-save it materialised (`t.contiguous()`/`t.clone()`); potluck copies "
        "views out, up to 16x their storage\n"
    )
    expected = [2, f"potluck: error: a.pt: {EXPANDED}\n{hint}"]
    assert [json.loads(line) for line in r.stdout.splitlines()] == [expected, expected]
    assert not (tmp_path / "out").exists() and not (tmp_path / "p.patch").exists()


def test_hostile_pickle_errors_name_the_file(tmp_path: Path) -> None:
    """merge, patch create and peft apply said only "pickle needs code execution"."""
    evil = with_pickle(pickle.dumps(_Evil(), protocol=2))
    (tmp_path / "good.pt").write_bytes(saved({"q.weight": torch.zeros(2, 2)}))
    (tmp_path / "evil.pt").write_bytes(evil)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.bin").write_bytes(evil)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["q"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    base = tmp_path / "base"
    base.mkdir()
    (base / "pytorch_model.bin").write_bytes(saved({"q.weight": torch.zeros(2, 2)}))
    results = in_dir(
        tmp_path,
        ["merge", "--method", "linear", "good.pt", "evil.pt", "-o", "m"],
        ["patch", "create", "good.pt", "evil.pt", "-o", "p.patch"],
        ["peft", "apply", "base", "adapter", "out"],
    )
    named = ["evil.pt", "evil.pt", "adapter/adapter_model.bin"]
    assert [(code, out.splitlines()[0]) for code, out in results] == [
        (2, f"potluck: error: {n}: {CODE_EXECUTION}") for n in named
    ]


class _Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_truncated_patch_says_truncated(tmp_path: Path) -> None:
    """It said "not a checkpoint potluck knows" when the cut fell inside the header."""
    header = build_header([("w/data", "F32", (4,))], {"potluck_patch": "1"})
    cases = {
        "in-header.patch": (
            header[:40],
            f"potluck patch is truncated (40 bytes, its header needs {len(header)})",
        ),
        "in-data.patch": (
            header + bytes(10),
            f"potluck patch is truncated ({len(header) + 10} "
            f"bytes, its header needs {len(header) + 16})",
        ),
    }
    for name, (blob, problem) in cases.items():
        (tmp_path / name).write_bytes(blob)
        res = CliRunner().invoke(cli, ["patch", "info", str(tmp_path / name)])
        assert res.exit_code == 2
        assert res.output == (
            f"potluck: error: {tmp_path / name}: {problem}\n"
            "hint: the download or copy was cut short; get the file again\n"
        )
    (tmp_path / "junk.patch").write_bytes(b"hello world")
    res = CliRunner().invoke(cli, ["patch", "info", str(tmp_path / "junk.patch")])
    assert (
        res.output.splitlines()[0]
        == f"potluck: error: {tmp_path / 'junk.patch'}: not a potluck patch"
    )


def test_model_files_with_views_list_every_tensor(tmp_path: Path) -> None:
    """A ``.pt`` with tied weights listed only its views as the model's tensors: merging it
    dropped every other tensor."""
    from potluck.ops.models import open_path

    shared = torch.arange(4.0)
    torch.save({"a": torch.ones(3), "b": shared, "c": shared[1:]}, tmp_path / "m.pt")
    with open_path(tmp_path / "m.pt") as src:
        assert src.names() == ["a", "b", "c"]
        assert np.array_equal(src.read("c"), [1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    ("index", "problem"),
    [
        ('{"weight_map":' + "[" * 3000 + "]" * 3000 + "}", "maximum recursion depth exceeded"),
        ('{"weight_map":["a.safetensors"]}', "'list' object has no attribute 'values'"),
        ('{"weight_map":{"w":5}}', "weight_map names a file with something not a string"),
    ],
)
def test_hostile_shard_index(tmp_path: Path, index: str, problem: str) -> None:
    """A shard index nested deeply or of the wrong shape gave a traceback."""
    from potluck.errors import UserError
    from potluck.ops.models import open_path

    (tmp_path / "model.safetensors.index.json").write_text(index)
    with pytest.raises(UserError) as e:
        open_path(tmp_path)
    path = tmp_path / "model.safetensors.index.json"
    assert e.value.message.startswith(f"{path}: not a valid shard index ({problem}")


def test_expanded_view_at_a_revision_names_rev_and_file(hostile: Path) -> None:
    """``potluck.load(path, rev)`` named only the tensor; now ``rev:path`` too."""
    add = bounded(["git", "add", "expand.pt"], hostile)
    assert (add.returncode, add.stderr) == (0, "")
    subprocess.run(["git", "commit", "-q", "-m", "expand"], cwd=hostile, check=True)
    code = (
        "import potluck, sys\n"
        "try:\n"
        "    potluck.load(sys.argv[1], rev='HEAD')\n"
        "except potluck.errors.FormatError as e:\n"
        "    print(e.message)\n"
    )
    r = bounded([sys.executable, "-c", code, str(hostile / "expand.pt")], hostile)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"HEAD:expand.pt: {EXPANDED}\n", "")
