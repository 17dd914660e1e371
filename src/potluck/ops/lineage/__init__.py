"""Lineage: where each model came from, pinned by content (issue 17). Filled in by its owner."""
