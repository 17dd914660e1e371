"""The bounded CI part of the fuzzing (issue 14): every reader of untrusted bytes gets 50
structure-aware generated inputs (``fuzz/``, derandomized: the same inputs on every run) in one
child process under an address-space limit, a per-example timer and a wall-clock timeout; each
input must end in a result or a ``PotluckError``. The longer, coverage-guided runs are in
``fuzz/README.md``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fuzz.targets import TARGETS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 50
CI_TARGETS = list(TARGETS)


@pytest.fixture(scope="module")
def fuzzed() -> dict[str, dict[str, Any]]:
    """Each target's outcome (one child runs them all: one interpreter start)."""
    args = ["--examples", str(EXAMPLES), "--json", "--memory", "2048", "--timeout", "30"]
    try:
        r = subprocess.run(
            [sys.executable, "-m", "fuzz", *CI_TARGETS, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=240,
        )
        out, err, code = r.stdout, r.stderr, r.returncode
    except subprocess.TimeoutExpired as e:
        out, err, code = _text(e.stdout), _text(e.stderr), "timeout"
    results = {d["target"]: d for d in map(json.loads, out.splitlines())}
    for name in CI_TARGETS:  # a target the child never finished (crash, limit, timeout)
        results.setdefault(name, {"ok": False, "failure": f"child ended ({code}): {err[-3000:]}"})
    return results


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


@pytest.mark.parametrize("target", CI_TARGETS)
def test_reader_ends_in_result_or_potluck_error(
    fuzzed: dict[str, dict[str, Any]], target: str
) -> None:
    result = fuzzed[target]
    assert result["ok"], result["failure"]
