"""Test-only: make the ``faulty://`` fsspec protocol (``testsupport.faultyfs``) known in every
Python process started with this directory on ``PYTHONPATH`` (git hooks, git's filter)."""

import fsspec

fsspec.register_implementation("faulty", "testsupport.faultyfs.FaultyFileSystem", clobber=True)
