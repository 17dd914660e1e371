"""The CLI loads subcommand modules lazily; every lazy name must be what its module registers."""

from __future__ import annotations

import importlib
import subprocess
import sys

from potluck.cli.main import LAZY_COMMANDS, cli


def test_every_lazy_command_is_registered_by_its_module() -> None:
    for name, module in LAZY_COMMANDS.items():
        importlib.import_module(f"potluck.cli.{module}")
        assert name in cli.commands, f"{module} does not register {name!r}"


def test_hooks_and_drivers_do_not_import_the_heavy_commands() -> None:
    code = (
        "import sys\n"
        "from potluck.cli import commands, drivers\n"
        "heavy = [m for m in ('potluck.cli.merge_cmd', 'potluck.ops.compose.manifest', "
        "'potluck.ops.peft', 'potluck.ops.merge.run') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
