"""Pure numpy helpers: dtype names, comparisons and statistics. No I/O."""
