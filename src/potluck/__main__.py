"""``python -m potluck`` runs the CLI."""

from potluck.cli.main import main

main()
