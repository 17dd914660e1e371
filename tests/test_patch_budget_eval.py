"""``patch create --budget --eval FILE``: the budget's errors weighted by Gram matrices of
TARGET on the --eval inputs — the same patch, byte for byte, as ``potluck stats gram`` on those
inputs followed by ``--gram`` (real tiny BERT checkpoints, real torch forward passes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import potluck.cli.patch_cmd  # noqa: E402  (registers `patch`)
import potluck.cli.stats_cmd  # noqa: E402, F401  (registers `stats`)
from potluck.cli.main import cli  # noqa: E402
from tiny_models import MOVIE_WORDS, save_tiny, tiny_bert  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """BASE and TARGET classifier directories (TARGET: every matrix changed) and inputs."""
    root = tmp_path_factory.mktemp("beval")
    config = {"hidden_size": 16, "num_hidden_layers": 1, "pad_token_id": 0, "num_labels": 3}
    model = tiny_bert(0, vocab_size=len(MOVIE_WORDS), classifier=True, **config)
    base, target = save_tiny(model, root / "base", MOVIE_WORDS), root / "target"
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _name, p in sorted(model.named_parameters()):
            if p.ndim == 2:
                p += 0.05 * torch.randn(p.shape, generator=gen)
    save_tiny(model, target, MOVIE_WORDS)
    ids = np.array([[int(c) for c in r.ljust(6, "0")] for r in
                    ("674201", "35", "224561", "7300", "452", "657321", "2", "334")])  # fmt: skip
    np.savez(root / "eval.npz", input_ids=ids, attention_mask=(ids != 0).astype(np.int64))
    return base, target, root / "eval.npz"


def test_eval_weighting_equals_stats_gram_then_gram(pair: tuple[Path, Path, Path]) -> None:
    base, target, data = pair
    runner = CliRunner()
    root = base.parent
    common = ["patch", "create", str(base), str(target), "--budget", "14500", "--json"]
    res = runner.invoke(cli, [*common, "-o", str(root / "eval.patch"), "--eval", str(data),
                              "--no-tune-scales"])  # fmt: skip
    assert res.exit_code == 0, res.output
    via_eval = json.loads(res.stdout)
    stats = root / "t.gram.stats"
    res = runner.invoke(cli, ["stats", "gram", str(target), "--data", str(data), "-o", str(stats),
                              "--embeddings", "--max-samples", "64"])  # fmt: skip
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, [*common, "-o", str(root / "gram.patch"), "--gram", str(stats)])
    assert res.exit_code == 0, res.output
    assert (root / "eval.patch").read_bytes() == (root / "gram.patch").read_bytes()
    res = runner.invoke(cli, [*common, "-o", str(root / "plain.patch")])
    plain = json.loads(res.stdout)
    moved = {n for n, t in plain["tensors"].items() if t != via_eval["tensors"][n]}
    assert moved  # the weights moved bytes between tensors
    assert via_eval["size"] <= 14500 and plain["size"] <= 14500


def test_eval_without_check_or_budget_and_with_gram_refused(
    pair: tuple[Path, Path, Path],
) -> None:
    base, target, data = pair
    out = base.parent / "no.patch"
    runner = CliRunner()
    args = ["patch", "create", str(base), str(target), "-o", str(out), "--eval", str(data)]
    res = runner.invoke(cli, args)
    assert res.exit_code != 0
    assert "--eval needs --check, --budget/--max-error (whose errors it then weights)" in (
        res.output
    )
    res = runner.invoke(cli, [*args, "--budget", "x4", "--gram", str(data)])
    assert res.exit_code != 0
    assert "--eval and --gram both weight the budget's errors; pass one of them" in res.output
    assert "Traceback" not in res.output and not out.exists()
