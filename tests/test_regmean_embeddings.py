"""RegMean over embeddings: a lookup is a linear layer on one-hot inputs, so its Gram matrix is
diagonal (how often each row was looked up). References: per-row loops, the full one-hot
least-squares problem, hand counting of a tiny BERT's lookups.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import UserError
from potluck.merging import MERGE_METHODS
from potluck.merging.base import TensorStats
from potluck.merging.regmean import diagonal_solve, solve_spd
from potluck.ops.merge.statsfile import load_stats, stats_for, write_stats
from tiny_models import save_tiny, tiny_bert, tiny_llama

REGMEAN = MERGE_METHODS.get("regmean")


def _naive_rows(weights, counts, tables):
    """Row j: Σᵢ λᵢcᵢⱼTᵢ[j] / Σᵢ λᵢcᵢⱼ, or the λ-weighted average when no model used row j."""
    n_rows, n_cols = tables[0].shape
    out = np.zeros((n_rows, n_cols))
    for j in range(n_rows):
        den = sum(w * c[j] for w, c in zip(weights, counts, strict=True))
        for k in range(n_cols):
            if den != 0:
                num = sum(
                    w * c[j] * t[j, k] for w, c, t in zip(weights, counts, tables, strict=True)
                )
                out[j, k] = num / den
            else:
                out[j, k] = sum(w * t[j, k] for w, t in zip(weights, tables, strict=True)) / sum(
                    weights
                )
    return out


def test_diagonal_solve_is_the_count_weighted_row_average() -> None:
    rng = np.random.default_rng(0)
    tables = rng.normal(size=(3, 7, 4))
    counts = [np.array([3, 0, 1, 0, 5, 0, 2.0]), np.array([0, 0, 4, 1, 5, 0, 0.0]),
              np.array([1, 0, 0, 0, 5, 0, 2.0])]  # fmt: skip
    weights = np.array([1.0, 0.5, 2.0])
    average = np.tensordot(weights, tables, axes=1) / weights.sum()
    got = diagonal_solve(weights, counts, tables, average)
    np.testing.assert_allclose(got, _naive_rows(weights, counts, tables), rtol=1e-13)
    # the same answer as the general solver on the diagonal matrices (rows 1 and 5: unused)
    lhs = sum(w * np.diag(c) for w, c in zip(weights, counts, strict=True))
    rhs = sum(w * np.diag(c) @ t for w, c, t in zip(weights, counts, tables, strict=True))
    np.testing.assert_allclose(got, solve_spd(lhs, rhs, average), rtol=1e-12, atol=1e-12)


def test_regmean_with_counts_is_the_one_hot_least_squares() -> None:
    """Σᵢ‖XᵢE − XᵢEᵢ‖² over one-hot lookups Xᵢ, solved with lstsq, equals the merged table."""
    rng = np.random.default_rng(1)
    vocab, dim = 9, 3
    tables = [rng.normal(size=(vocab, dim)) for _ in range(2)]
    ids = [rng.integers(0, 6, size=20), rng.integers(3, 9, size=15)]  # rows 3-5 shared
    onehots = [np.eye(vocab)[i] for i in ids]
    counts = [x.sum(axis=0) for x in onehots]
    stats = [TensorStats(c, "gram", 0) for c in counts]
    got = REGMEAN.merge(tables, None, None, name="emb", seed=0, stats=stats)
    x_all = np.vstack(onehots)
    y_all = np.vstack([x @ t for x, t in zip(onehots, tables, strict=True)])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(got[0], tables[0][0])  # only model 0 looked row 0 up
    np.testing.assert_array_equal(got[8], tables[1][8])


def test_regmean_refuses_diagonal_and_full_grams_mixed() -> None:
    w = [np.zeros((2, 4)), np.ones((2, 4))]
    stats = [TensorStats(np.eye(4), "gram", 1), TensorStats(np.ones(4), "gram", 1)]
    with pytest.raises(UserError, match=re.escape("mix diagonals (embedding lookup counts)")):
        REGMEAN.merge(w, None, None, name="fc", seed=0, stats=stats)


@pytest.mark.parametrize(
    ("diag", "message"),
    [
        (np.ones(5), "are a diagonal Gram of length 5, but input axis 0 has 6 rows"),
        (np.array([1.0, -1.0, 0, 0, 0, 0]), "are not positive semi-definite"),
    ],
)
def test_bad_diagonal_grams_are_refused(diag: np.ndarray, message: str) -> None:
    tables = [np.zeros((6, 2)), np.ones((6, 2))]
    stats = [TensorStats(np.ones(6), "gram", 0), TensorStats(diag, "gram", 0)]
    with pytest.raises(UserError, match=message):
        REGMEAN.merge(tables, None, None, name="emb", seed=0, stats=stats)


def test_stats_file_round_trips_a_diagonal_gram(tmp_path: Path) -> None:
    counts = np.array([0.0, 3.0, 1.0, 7.0], dtype=np.float32)
    full = np.eye(3, dtype=np.float32) * 2
    path = tmp_path / "g.stats"
    write_stats(path, "gram", {"emb.weight": counts, "fc.weight": full}, samples=1, tokens=11,
                input_axes={"emb.weight": 0, "fc.weight": 1})  # fmt: skip
    f = load_stats(path)
    assert f.input_axes == {"emb.weight": 0, "fc.weight": 1}
    got = f.get("emb.weight")
    assert got is not None
    np.testing.assert_array_equal(got, counts)
    (entry,) = stats_for([f], "emb.weight", [np.zeros((4, 2), np.float32)])
    assert entry is not None and entry.input_axis == 0
    with pytest.raises(
        UserError, match=re.escape("diagonal Gram of 'emb.weight' has negative values")
    ):
        write_stats(tmp_path / "bad.stats", "gram", {"emb.weight": -counts}, samples=1,
                    tokens=1, input_axes={"emb.weight": 0})  # fmt: skip
    assert not (tmp_path / "bad.stats").exists()


def test_gram_matrices_count_a_tiny_berts_lookups() -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from potluck.ops.merge.stats_torch import gram_matrices, input_axes

    model = tiny_bert(0, vocab_size=20, hidden_size=8, num_hidden_layers=1,
                      max_position_embeddings=10, type_vocab_size=2)  # fmt: skip
    ids = torch.tensor([[2, 5, 5, 7, 0], [3, 5, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    types = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]])
    batches = [{"input_ids": ids, "attention_mask": mask, "token_type_ids": types}]
    got = gram_matrices(model, batches, embeddings=True)
    words, positions, kinds = np.zeros(20), np.zeros(10), np.zeros(2)
    for row in range(2):
        for pos in range(5):
            if mask[row, pos]:
                words[int(ids[row, pos])] += 1
                positions[pos] += 1
                kinds[int(types[row, pos])] += 1
    np.testing.assert_array_equal(got["embeddings.word_embeddings.weight"], words)
    np.testing.assert_array_equal(got["embeddings.position_embeddings.weight"], positions)
    np.testing.assert_array_equal(got["embeddings.token_type_embeddings.weight"], kinds)
    axes = input_axes(model, embeddings=True)
    assert axes["embeddings.word_embeddings.weight"] == 0 and axes[
        "encoder.layer.0.attention.self.query.weight"] == 1  # fmt: skip
    plain = gram_matrices(model, batches)
    assert not any("embeddings." in n and n.endswith("_embeddings.weight") for n in plain)


def test_cli_gram_embeddings_writes_the_lookup_counts(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from click.testing import CliRunner

    import potluck.cli.stats_cmd  # noqa: F401  (registers `stats`)
    from potluck.cli.main import cli
    from potluck.ops.merge.stats_torch import compute_stats

    save_tiny(tiny_llama(0, vocab_size=16, pad_token_id=0), tmp_path / "m")
    ids = np.array([[1, 5, 5, 9, 0], [2, 5, 0, 0, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    out = tmp_path / "g.stats"
    args = ["stats", "gram", str(tmp_path / "m"), "--data", str(tmp_path / "d.npz"),
            "-o", str(out), "--embeddings"]  # fmt: skip
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    f = load_stats(out)
    counts = np.bincount(ids[mask == 1], minlength=16).astype(np.float32)
    got = f.get("model.embed_tokens.weight")
    assert got is not None and f.input_axes["model.embed_tokens.weight"] == 0
    np.testing.assert_array_equal(got, counts)
    with pytest.raises(UserError, match="--embeddings applies to Gram statistics only"):
        compute_stats("fisher", tmp_path / "m", tmp_path / "d.npz", tmp_path / "f.stats",
                      embeddings=True)  # fmt: skip
    assert not (tmp_path / "f.stats").exists()
