"""Fuzzing of every reader of untrusted bytes (issue 14): structure-aware hypothesis
generators (``pickles``, ``files``, ``texts``), the targets (``targets``) and a runner with
memory and time bounds (``python -m fuzz``; see ``fuzz/README.md``)."""
