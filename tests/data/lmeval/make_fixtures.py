"""Regenerate the lm-evaluation-harness fixtures of tests/test_evals_import.py with the real
package (``pip install lm-eval``; runs offline in seconds):

    python tests/data/lmeval/make_fixtures.py

A local multiple-choice task (``tiny_sums``, 40 items in tiny_sums.jsonl) is run by
``lm_eval`` on two tiny numpy GPTs (potluck.demo.model, byte tokens), registered as an lm-eval
model ``potluck_tiny``: ``base`` and ``tuned`` (layer 0 nudged). Each run writes
``results_*.json`` and ``samples_tiny_sums_*.jsonl`` (``--log_samples``); they are copied here
as ``<model>/results.json`` and ``<model>/samples_tiny_sums.jsonl``, plus the model files
``<model>.npz`` whose weights the results describe.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from potluck.demo.model import TinyConfig, forward, init_params

HERE = Path(__file__).parent
CFG = TinyConfig(vocab=256, d=32, layers=2, ffn=64, ctx=64)


@register_model("potluck_tiny")
class TinyGPT(LM):  # type: ignore[misc]
    """The demo's numpy GPT over bytes, loaded from ``path=<file>.npz``."""

    def __init__(self, path: str, **_: object) -> None:
        super().__init__()
        with np.load(path) as z:
            self.p = {k: z[k] for k in z.files}

    def _logprob(self, context: str, cont: str) -> tuple[float, bool]:
        ids = list((context + cont).encode())[-CFG.ctx :]
        n = len(cont.encode())
        logits = forward(self.p, np.asarray(ids[:-1]))
        top = logits.max(-1, keepdims=True)
        lp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        tgt = ids[-n:]
        rows = lp[-n:]
        total = float(sum(rows[i, t] for i, t in enumerate(tgt)))
        greedy = all(int(rows[i].argmax()) == t for i, t in enumerate(tgt))
        return total, greedy

    def loglikelihood(self, requests):  # type: ignore[no-untyped-def]
        return [self._logprob(*r.args) for r in requests]

    def loglikelihood_rolling(self, requests):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    def generate_until(self, requests):  # type: ignore[no-untyped-def]
        raise NotImplementedError


TASK = """task: tiny_sums
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _models() -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(3)
    base = init_params(CFG, rng)
    tuned = {
        k: (v + 0.05 * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32)
        if k.startswith("h.0.")
        else v
        for k, v in base.items()
    }
    return {"base": base, "tuned": tuned}


def _dataset(path: Path) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(40):
            a, b = (int(x) for x in rng.integers(1, 10, 2))
            f.write(
                json.dumps(
                    {
                        "question": f"{a}+{b}=",
                        "label": 0,
                        "choices": [str(a + b), str(a + b + 1), str(a * b + 2)],
                    }
                )
                + "\n"
            )


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    _dataset(HERE / "tiny_sums.jsonl")
    with tempfile.TemporaryDirectory() as tmp:
        tasks = Path(tmp) / "tasks"
        tasks.mkdir()
        (tasks / "tiny_sums.yaml").write_text(TASK.format(data=HERE / "tiny_sums.jsonl"))
        for name, params in _models().items():
            np.savez(HERE / f"{name}.npz", **params)
            out = Path(tmp) / name
            sys.argv = [
                "lm_eval",
                "--model",
                "potluck_tiny",
                "--model_args",
                f"path={HERE / f'{name}.npz'}",
                "--tasks",
                "tiny_sums",
                "--include_path",
                str(tasks),
                "--output_path",
                str(out),
                "--log_samples",
                "--seed",
                "1234",
            ]
            cli_evaluate()
            (HERE / name).mkdir(exist_ok=True)
            shutil.copy(next(out.rglob("results_*.json")), HERE / name / "results.json")
            shutil.copy(
                next(out.rglob("samples_tiny_sums_*.jsonl")),
                HERE / name / "samples_tiny_sums.jsonl",
            )


if __name__ == "__main__":
    main()
