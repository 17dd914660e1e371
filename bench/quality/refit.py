"""``python -m bench.quality.refit``: a diagnostic, not the issue's protocol (which keeps each
contributor's fine-tuned head). Each task gets a fresh linear head trained on the *merged*
encoder's embeddings of its own training split (the linear-probe recipe of ``stages``: L-BFGS,
L2 picked on validation), scored on test. It separates what a merge keeps in its features from
what it loses because the old heads no longer fit the merged encoder.

Reads the best merge of each method from ``merges-s<seed>/`` (run ``python -m bench.quality``
first); writes ``refit-s<seed>.json`` and prints one line per method.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import data, model

from . import stages
from .run import TASKS

DEFAULT_METHODS = ("tsv", "regmean", "ties", "linear")


def refit_scores(weights: Path, tasks: list[data.Task], seed: int) -> dict[str, float]:
    """Test accuracy of a probe trained on the ``weights`` encoder, per task."""
    tok, enc = model.load_tokenizer(), model.load_encoder()
    model.load_weights(enc, weights)
    out = {}
    for t in tasks:
        splits = (t.train, t.val, t.test)
        emb = [model.embed(enc, tok, s.texts, max_length=stages.MAX_LENGTH) for s in splits]
        out[t.name] = float(stages.linear_probe(t, *emb, seed)["test_acc"])
    return out


def main(argv: list[str] | None = None) -> int:
    """Probe every method's best merged encoder for each seed."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS))
    p.add_argument("--out", type=Path, default=stages.RESULTS)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    for seed in args.seeds:
        tasks = [data.load_task(n, seed=seed) for n in TASKS]
        results = {}
        for method in args.methods:
            t0 = time.perf_counter()
            best = json.loads((args.out / f"merges-s{seed}" / f"{method}.json").read_text())
            scores = refit_scores(Path(best["weights"]), tasks, seed)
            results[method] = {"test": scores, "s": round(time.perf_counter() - t0, 1)}
            avg = 100 * sum(scores.values()) / len(scores)
            print(f"seed {seed} {method}: avg {avg:.1f} {scores}", flush=True)
        (args.out / f"refit-s{seed}.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
