"""bench.patch: patch codecs on the real all-MiniLM-L6-v2 and a CPU fine-tune of it (``python -m
bench.patch``; see bench/README.md)."""
