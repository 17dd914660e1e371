"""potluck's benchmarks: one package, run from the repository root (not shipped in the wheel).

Each benchmark is a sub-package run as ``.venv/bin/python -m bench.<name>`` (``vcs``, ``remote``,
``merge``, ``patch``, ``modular``, ``quality``; ``mergekit_fixtures`` rebuilds the mergekit test
fixtures); what several of them use lives in ``bench.common``. See ``bench/README.md``.
"""
