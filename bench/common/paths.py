"""Where things are: the repository, the benchmark caches, the tools' virtual environments."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_ROOT = BENCH_DIR.parent
#: Caches and outputs of every benchmark (ignored by git).
RESULTS = BENCH_DIR / "results"
#: The project's venv: ``potluck`` and ``git-potluck``.
POTLUCK_BIN = REPO_ROOT / ".venv" / "bin"
#: git-theta's own venv (see bench/requirements-reference.txt).
THETA_BIN = BENCH_DIR / ".venv-theta" / "bin"
