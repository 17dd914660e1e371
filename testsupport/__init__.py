"""Helpers shared by the test suite and the benchmarks; importable from the repository root
(pytest's ``pythonpath = ["."]``, ``python -m bench.<name>``), not shipped in the wheel.

* ``servers``: real servers on loopback (giftless Git LFS, moto S3) and their pytest fixtures.
* ``memory``: the peak memory of a call as tracemalloc sees it (``traced_peak``).
"""
