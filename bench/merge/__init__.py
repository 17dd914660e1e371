"""bench.merge: ``potluck merge`` vs mergekit on ~1 GB Llama-shaped models (``python -m
bench.merge``; see bench/README.md)."""
