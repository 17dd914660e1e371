"""Process settings for the CPU runs; the standard library only, so it can run before numpy is
imported (``python -m bench.patch`` does, to size numpy's BLAS thread pool)."""

from __future__ import annotations

import os


def offline() -> None:
    """Tell huggingface_hub / transformers never to reach a hub (bench scripts only)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def cpu_threads(threads: int | str) -> None:
    """Thread settings for the CPU runs; call before torch or numpy is imported.

    ``OMP_WAIT_POLICY=PASSIVE``: on a shared, oversubscribed machine OpenMP's spinning barriers
    made each training step ~5× slower with 2 threads (measured here: 8×53 tokens, fwd+bwd+step
    ~9 s active vs ~1.8 s passive under a load average of 8 on 2 cores).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)
