"""The CLI loads subcommand modules lazily; every lazy name must be what its module registers."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys

from potluck.cli.main import LAZY_COMMANDS, cli


def test_every_lazy_command_is_registered_by_its_module() -> None:
    for name, module in LAZY_COMMANDS.items():
        importlib.import_module(f"potluck.cli.{module}")
        assert name in cli.commands, f"{module} does not register {name!r}"


def loaded_after(imports: str, modules: tuple[str, ...]) -> list[str]:
    """Which of ``modules`` a fresh interpreter holds after running ``imports`` (a module
    blocked with a ``None`` entry in ``sys.modules`` is not loaded)."""
    code = f"import sys\n{imports}\nprint([m for m in {modules!r} if sys.modules.get(m)])\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return ast.literal_eval(out.stdout.strip())  # type: ignore[no-any-return]


def test_hooks_and_drivers_do_not_import_the_heavy_commands() -> None:
    heavy = ("potluck.cli.merge_cmd", "potluck.ops.compose.manifest", "potluck.ops.peft",
             "potluck.ops.merge.run")  # fmt: skip
    assert loaded_after("from potluck.cli import commands, drivers", heavy) == []


def test_a_filter_adding_safetensors_does_not_import_numpy(tmp_path) -> None:
    """numpy costs a git filter's start a tenth of a second; the clean of a safetensors file
    of small tensors (no deltas, no statistics) runs without it, and without the zip and
    pickle readers of the other formats."""
    code = (
        "import io, pathlib, sys\n"
        "from potluck.cli import drivers\n"
        "from potluck.config import RepoConfig\n"
        "from potluck.ops.vcs.odb import ObjectDB\n"
        "from potluck.ops.vcs.snapshot import snapshot_stream\n"
        "from potluck.store.local import LocalStore\n"
        "from potluck.objects.manifest import dumps\n"
        'head = b\'{"a":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]},\'\n'
        'head += b\'"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}\'\n'
        "data = len(head).to_bytes(8, 'little') + head + bytes(range(8))\n"
        f"db = ObjectDB(LocalStore({str(tmp_path)!r}), RepoConfig())\n"
        f"tmp = pathlib.Path({str(tmp_path)!r})\n"
        "m, _ = snapshot_stream(io.BytesIO(data), db, None, name='x', spill_dir=tmp)\n"
        "dumps(m)\n"
        "heavy = ('numpy', 'ml_dtypes', 'zipfile', 'pickle', 'potluck.formats.torch_zip')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_git_starts_its_filter_process_without_click(tmp_path) -> None:
    """``git-potluck filter-process`` (started for every add and checkout) loads no click, and
    an error still ends as the CLI's would: a message on stderr and the error's exit code."""
    assert loaded_after("from potluck.cli import entry, filter_entry", ("click",)) == []
    code = "import sys\nsys.argv = ['git-potluck', 'filter-process']\n"
    code += "from potluck.cli import entry\nentry.main()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("potluck: error: `git rev-parse --show-toplevel")
    assert "not a git repository" in proc.stderr and "Traceback" not in proc.stderr
