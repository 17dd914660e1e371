"""bench.modular: does routing among community experts beat merging them? (``python -m
bench.modular``; contributors in ``contrib``, the evaluation protocol in ``evaluate``, the rows
that pool training data in ``pooled``, a per-layer Arrow diagnosis in ``arrow_diag``)."""
