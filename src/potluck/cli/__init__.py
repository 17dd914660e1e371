"""Command-line interface (thin: parse, call one library function, render, exit code)."""
