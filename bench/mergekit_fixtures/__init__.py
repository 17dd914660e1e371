"""bench.mergekit_fixtures: rebuild the mergekit equivalence fixtures under
``tests/fixtures/mergekit/`` with the mergekit venv (``python -m bench.mergekit_fixtures``)."""
