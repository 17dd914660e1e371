"""``tokenizer_source`` / ``tokenizer:`` against real mergekit 0.1.5 (issue 16).

Fixtures: ``tests/fixtures/mergekit/tokenizer/`` (``python -m bench.mergekit_fixtures
--tokenizer``): three tiny models whose WordLevel vocabularies differ (see
``bench/mergekit_fixtures/tokenizer_cases.py``: tokens only one fine-tune has, a token both
fine-tunes but not the base have, base tokens one fine-tune lacks, another id order), merged by
task arithmetic with ``tokenizer_source`` union, base, a model, and ``tokenizer:`` with
``pad_to_multiple_of``. mergekit numbers the union's new tokens in hash order, so vocabularies and
vocabulary rows are compared by token string; every row and every other tensor within 16 float32
ulps of mergekit's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from potluck.cli.main import cli
from potluck.errors import UserError
from potluck.ops.merge.config import load_config
from potluck.ops.merge.run import run_merge
from tests.test_mergekit_equiv import EPS32, TOL_ULPS, read_dir, read_safetensors

ROOT = Path(__file__).resolve().parent / "fixtures" / "mergekit" / "tokenizer"
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def token_ids(path: Path) -> dict[str, int]:
    """token → id of a ``tokenizer.json`` (model vocabulary and added tokens)."""
    data = json.loads(path.read_text())
    ids = dict(data["model"]["vocab"])
    ids.update({e["content"]: e["id"] for e in data.get("added_tokens", [])})
    return ids


def localized(case: str, tmp_path: Path, models: Path = ROOT / "models") -> Path:
    text = (ROOT / case / "config.yaml").read_text().replace("../models/", f"{models}/")
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    return path


def close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    scale = max(float(np.abs(want).max(initial=0)), 0.07)  # inputs are |x| < 0.07 (gains ≈ 1)
    diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max(initial=0))
    assert diff <= TOL_ULPS * EPS32 * scale, f"{what}: |Δ| {diff:.3g}"


@pytest.mark.parametrize("case", ["union", "base", "model", "union_pad"])
def test_tokenizer_merge_matches_mergekit(case: str, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_merge(load_config(localized(case, tmp_path)), out)
    got, want = read_dir(out), read_safetensors(ROOT / case / "mergekit.safetensors")
    got_ids, want_ids = (
        token_ids(out / "tokenizer.json"),
        token_ids(ROOT / case / "mergekit-tokenizer.json"),
    )
    assert sorted(got_ids) == sorted(want_ids)
    assert sorted(got_ids.values()) == list(range(len(got_ids)))
    want_cfg = json.loads((ROOT / case / "mergekit-config.json").read_text())
    assert json.loads((out / "config.json").read_text())["vocab_size"] == want_cfg["vocab_size"]
    assert sorted(got) == sorted(want)
    for name in sorted(want):
        assert got[name].shape == want[name].shape, name
        if name not in VOCAB_TENSORS:
            close(got[name], want[name], name)
            continue
        for tok, i in want_ids.items():
            close(got[name][got_ids[tok]], want[name][i], f"{name} {tok!r}")
        close(got[name][len(want_ids) :], want[name][len(want_ids) :], f"{name} padding")


def test_union_tokenizer_file_encodes_the_new_tokens(tmp_path: Path) -> None:
    """The written tokenizer.json loads and maps every token of every model to its row."""
    tokenizers = pytest.importorskip("tokenizers")
    out = tmp_path / "out"
    run_merge(load_config(localized("union", tmp_path)), out)
    tok = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = token_ids(out / "tokenizer.json")
    assert tok.encode("w3 x1 shared y2 w12").ids == [
        ids[t] for t in ["w3", "x1", "shared", "y2", "w12"]
    ]
    assert len(ids) == 20  # 16 of the base + x1, shared, x2, y2


def test_union_fills_rows_as_mergekit(tmp_path: Path) -> None:
    """Task arithmetic after alignment: a token only ft1 has gets ft1's row in every input (so
    the merge keeps it); base tokens ft2 lacks take the base's row in ft2; ``shared`` (ft1 and
    ft2, not the base) starts from their mean in the base."""
    out = tmp_path / "out"
    run_merge(load_config(localized("union", tmp_path)), out)
    emb = read_dir(out)["model.embed_tokens.weight"].astype(np.float64)
    ids = token_ids(out / "tokenizer.json")
    rows = {
        k: (read_dir(ROOT / "models" / k)["model.embed_tokens.weight"].astype(np.float64),
            token_ids(ROOT / "models" / k / "tokenizer.json"))
        for k in ("base", "ft1", "ft2")
    }  # fmt: skip

    def row(model: str, tok: str) -> np.ndarray:
        return np.asarray(rows[model][0][rows[model][1][tok]])

    np.testing.assert_allclose(emb[ids["x1"]], row("ft1", "x1"), rtol=0, atol=1e-8)
    np.testing.assert_allclose(
        emb[ids["w12"]], row("base", "w12") + 0.6 * (row("ft1", "w12") - row("base", "w12")),
        rtol=0, atol=1e-8,
    )  # fmt: skip
    mean = (row("ft1", "shared") + row("ft2", "shared")) / 2
    want = mean + 0.6 * (row("ft1", "shared") - mean) + 0.4 * (row("ft2", "shared") - mean)
    np.testing.assert_allclose(emb[ids["shared"]], want, rtol=0, atol=1e-8)


# ── bad input ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
def models_copy(tmp_path: Path) -> Path:
    dst = tmp_path / "models"
    shutil.copytree(ROOT / "models", dst)
    return dst


def test_unknown_tokenizer_source_is_refused_before_writing(tmp_path: Path) -> None:
    cfg = localized("union", tmp_path)
    cfg.write_text(cfg.read_text().replace("tokenizer_source: union", "tokenizer_source: unoin"))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["merge", str(cfg), "-o", str(out)])
    assert res.exit_code == 2, res.output
    assert "tokenizer_source: 'unoin' is not union, base or a model directory" in res.output
    assert "Traceback" not in res.output
    assert not out.exists()


def test_model_without_tokenizer_is_named(tmp_path: Path, models_copy: Path) -> None:
    (models_copy / "ft2" / "tokenizer.json").unlink()
    with pytest.raises(UserError) as e:
        run_merge(load_config(localized("union", tmp_path, models_copy)), tmp_path / "out")
    assert e.value.message == (
        f"{models_copy}/ft2 has no tokenizer.json, so its vocabulary cannot be aligned"
    )
    assert not (tmp_path / "out").exists()


def test_token_beyond_the_embedding_is_named(tmp_path: Path, models_copy: Path) -> None:
    """A tokenizer whose ids do not fit the weights: the model and the token are named."""
    cfg = models_copy / "ft1" / "config.json"
    cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "vocab_size": 40}))
    path = models_copy / "ft1" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"].append({"id": 18, "content": "far", "special": False})
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        run_merge(load_config(localized("union", tmp_path, models_copy)), tmp_path / "out")
    assert e.value.message == (
        f"{models_copy}/ft1: token 'far' has id 18, but lm_head.weight has only 18 rows, so its "
        "vocabulary cannot be aligned"
    )
    assert e.value.data["token"] == "far"


def test_duplicate_ids_are_named(tmp_path: Path, models_copy: Path) -> None:
    path = models_copy / "ft2" / "tokenizer.json"
    data = json.loads(path.read_text())
    data["added_tokens"].append({"id": 3, "content": "dup", "special": False})
    path.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        run_merge(load_config(localized("union", tmp_path, models_copy)), tmp_path / "out")
    assert e.value.message == (
        f"{models_copy}/ft2: tokens 'w1' and 'dup' have the same id 3, so its vocabulary "
        "cannot be aligned"
    )


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("tokenizer: {source: base}\n", "give tokenizer_source or tokenizer, not both"),
        ("tokenizer: {source: union, tokens: {x: {source: base}}}\n",
         "tokenizer must be a mapping of source and pad_to_multiple_of"),
        ("tokenizer: {pad_to_multiple_of: 0}\n",
         "tokenizer.pad_to_multiple_of must be a positive integer"),
    ],
)  # fmt: skip
def test_tokenizer_key_errors(tmp_path: Path, extra: str, message: str) -> None:
    cfg = localized("union", tmp_path)
    text = cfg.read_text()
    if "tokenizer_source" not in extra and "not both" not in message:
        text = text.replace("tokenizer_source: union\n", "")
    cfg.write_text(text + extra)
    with pytest.raises(UserError) as e:
        load_config(cfg)
    assert message in e.value.message


def test_token_no_model_has_gets_zeros(tmp_path: Path, models_copy: Path) -> None:
    """``tokenizer_source`` a tokenizer beyond the inputs: its token no model has is a zero row."""
    other = tmp_path / "other"
    other.mkdir()
    data = json.loads((models_copy / "ft1" / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 18, "content": "zz", "special": False})
    (other / "tokenizer.json").write_text(json.dumps(data))
    cfg = localized("union", tmp_path, models_copy)
    cfg.write_text(cfg.read_text().replace("tokenizer_source: union", f"tokenizer_source: {other}"))
    out = tmp_path / "out"
    run_merge(load_config(cfg), out)
    ids = token_ids(out / "tokenizer.json")
    assert ids == token_ids(other / "tokenizer.json")
    merged = read_dir(out)
    for name in VOCAB_TENSORS:
        assert merged[name].shape == (19, 8)
        np.testing.assert_array_equal(merged[name][18], np.zeros(8, np.float32))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 19
