"""Scale benchmark: many small tensors and one huge tensor (python -m bench.scale)."""
