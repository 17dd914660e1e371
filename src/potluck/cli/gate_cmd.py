"""CLI module for `potluck gate` (being built; registers its commands here)."""
