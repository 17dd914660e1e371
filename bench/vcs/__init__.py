"""bench.vcs: potluck vs git-lfs vs git-theta on a GPT-2-shaped checkpoint history (``python -m
bench.vcs``; see bench/README.md)."""
