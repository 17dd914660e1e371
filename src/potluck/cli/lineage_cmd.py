"""CLI module for `potluck lineage` (being built; registers its commands here)."""
