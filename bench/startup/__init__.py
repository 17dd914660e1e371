"""bench.startup: how fast ``potluck --version``, git's filter process and ``git log -p`` start
(``python -m bench.startup``; see bench/README.md)."""
