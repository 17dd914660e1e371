"""bench.remote: push to and clone from one loopback Git LFS server, potluck vs git-lfs
(``python -m bench.remote``; see bench/README.md)."""
