"""CLI module for `potluck hub` (being built; registers its commands here)."""
