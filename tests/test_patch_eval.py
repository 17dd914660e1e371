"""``potluck patch create --check --eval``: the change in a model's outputs (``ops.patch_eval``).

Tiny random BERTs built here (no downloads). The reference runs the target and the applied
patch (``patch apply`` output) through transformers itself and computes cosines, differences
and argmax changes in a float64 Python loop.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

from click.testing import CliRunner  # noqa: E402

import potluck.cli.patch_cmd  # noqa: E402, F401  (registers `patch`)
from potluck.cli.main import cli  # noqa: E402
from tiny_models import MOVIE_WORDS, save_tiny, tiny_bert  # noqa: E402

CHANGED = [
    "bert.encoder.layer.0.attention.self.query.weight",
    "bert.encoder.layer.0.intermediate.dense.weight",
    "classifier.weight",
]


def _pair(root: Path, classifier: bool) -> tuple[Path, Path]:
    """BASE and TARGET directories: TARGET = BASE + a dense change of three matrices."""
    config = {"hidden_size": 8, "num_hidden_layers": 1, "pad_token_id": 0, "num_labels": 3}
    model = tiny_bert(0, vocab_size=len(MOVIE_WORDS), classifier=classifier, **config)
    base, target = save_tiny(model, root / "base", MOVIE_WORDS), root / "target"
    gen = torch.Generator().manual_seed(1)
    params = dict(model.named_parameters())
    prefix = "" if classifier else "bert."
    with torch.no_grad():
        for name in CHANGED:
            if name.removeprefix(prefix) in params:
                p = params[name.removeprefix(prefix)]
                p += 0.5 * torch.randn(p.shape, generator=gen)
    save_tiny(model, target, MOVIE_WORDS)
    return base, target


@pytest.fixture(scope="module")
def clf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _pair(tmp_path_factory.mktemp("clf"), classifier=True)


def _npz(path: Path) -> dict[str, np.ndarray]:
    rows = ["67420", "35000", "22456", "73000", "45200", "65732", "20000", "33400", "56723", "4"]
    ids = np.array([[int(c) for c in r.ljust(5, "0")] for r in rows], dtype=np.int64)
    data = {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}
    np.savez(path, **data)
    return data


def _create(*args: str, code: int = 0) -> dict:
    res = CliRunner().invoke(cli, ["patch", "create", *args, "--json"])
    assert res.exit_code == code, res.output
    return json.loads(res.stdout) if code == 0 else {"stderr": res.stderr}


def _reference(target: Path, patched: Path, cls: type, batch: dict) -> dict:
    """cosines / max |diff| / argmax changes by hand, from two from_pretrained models."""
    inputs = {k: torch.tensor(v) for k, v in batch.items()}
    outs = []
    for d in (target, patched):
        model = cls.from_pretrained(d).eval()
        with torch.no_grad():
            out = model(**inputs)
        if hasattr(out, "logits"):
            outs.append(out.logits.double().numpy())
        else:  # mean over the non-padding tokens, one example and one token at a time
            h = out.last_hidden_state.double().numpy()
            mask = batch["attention_mask"]
            rows = [
                sum(h[n, t] for t in range(h.shape[1]) if mask[n, t]) / mask[n].sum()
                for n in range(len(h))
            ]
            outs.append(np.array(rows))
    a, b = outs
    cos = []
    for x, y in zip(a, b, strict=True):
        dot = sum(float(p) * float(q) for p, q in zip(x, y, strict=True))
        cos.append(dot / math.sqrt(sum(float(p) ** 2 for p in x) * sum(float(q) ** 2 for q in y)))
    diff = max(
        abs(float(p) - float(q))
        for x, y in zip(a, b, strict=True)
        for p, q in zip(x, y, strict=True)
    )
    changed = sum(int(np.argmax(x) != np.argmax(y)) for x, y in zip(a, b, strict=True))
    return {"cos": cos, "diff": diff, "changed": changed}


def test_exact_patch_leaves_outputs_unchanged(clf: tuple[Path, Path], tmp_path: Path) -> None:
    base, target = clf
    data = tmp_path / "eval.npz"
    _npz(data)
    args = [str(base), str(target), "-o", str(tmp_path / "p.patch"), "--check"]
    got = _create(*args, "--eval", str(data), "--threads", "1")["check"]["outputs"]
    assert got == {
        "task": "classification",
        "output": "logits",
        "examples": 10,
        "mean_cosine": 1.0,
        "min_cosine": 1.0,
        "max_abs_diff": 0.0,
        "changed_predictions": 0,
        "changed_fraction": 0.0,
    }


def test_lossy_patch_matches_hand_computed_outputs(clf: tuple[Path, Path], tmp_path: Path) -> None:
    """TARGET as a file next to its config.json (the model is rebuilt from its tensors)."""
    base, target = clf
    data = tmp_path / "eval.npz"
    batch = _npz(data)
    patch = tmp_path / "p.patch"
    args = [str(base), str(target / "model.safetensors"), "-o", str(patch), "--check"]
    args += ["--codec", "lowrank", "--rank", "1", "--eval", str(data), "--eval-max", "9"]
    got = _create(*args)["check"]["outputs"]
    res = CliRunner().invoke(
        cli, ["patch", "apply", str(base), str(patch), "-o", str(tmp_path / "o")]
    )
    assert res.exit_code == 0, res.output
    nine = {k: v[:9] for k, v in batch.items()}
    ref = _reference(target, tmp_path / "o", transformers.BertForSequenceClassification, nine)
    assert got["examples"] == 9 and got["output"] == "logits"
    assert got["mean_cosine"] == pytest.approx(sum(ref["cos"]) / 9, abs=1e-5)
    assert got["min_cosine"] == pytest.approx(min(ref["cos"]), abs=1e-5)
    assert got["max_abs_diff"] == pytest.approx(ref["diff"], rel=1e-5)
    assert got["changed_predictions"] == ref["changed"]
    assert got["changed_fraction"] == ref["changed"] / 9
    assert min(ref["cos"]) < 0.999 and ref["changed"] > 0  # the check measures a real change
    assert not any(p.name.startswith(".potluck-eval") for p in tmp_path.iterdir())


def test_text_eval_of_a_bare_encoder_pools_hidden_states(tmp_path: Path) -> None:
    base, target = _pair(tmp_path, classifier=False)
    texts = ["the movie was good", "bad plot", "good good movie the plot", "was"]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    patch = tmp_path / "p.patch"
    args = [
        str(base),
        str(target),
        "-o",
        str(patch),
        "--check",
        "--codec",
        "lowrank",
        "--rank",
        "1",
    ]
    res = CliRunner().invoke(cli, ["patch", "create", *args, "--eval", str(data)])
    assert res.exit_code == 0, res.output
    last = res.stdout.splitlines()[-1]
    assert last.startswith("outputs (mean-pooled last hidden state, 4 examples): cosine mean ")
    assert "changed predictions" not in last
    got = _create(*args, "--eval", str(data))["check"]["outputs"]
    assert got["task"] == "base" and got["changed_predictions"] is None
    apply = ["patch", "apply", str(base), str(patch), "-o", str(tmp_path / "o")]
    assert CliRunner().invoke(cli, apply).exit_code == 0
    enc = transformers.AutoTokenizer.from_pretrained(target)(texts, padding=True)
    batch = {k: np.array(enc[k]) for k in ("input_ids", "attention_mask")}
    ref = _reference(target, tmp_path / "o", transformers.BertModel, batch)
    assert got["mean_cosine"] == pytest.approx(sum(ref["cos"]) / 4, abs=1e-5)
    assert got["min_cosine"] == pytest.approx(min(ref["cos"]), abs=1e-5)
    assert got["max_abs_diff"] == pytest.approx(ref["diff"], rel=1e-5)
    assert min(ref["cos"]) < 0.9999


def test_eval_needs_a_config_json_target(clf: tuple[Path, Path], tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    base, target = clf
    lone = tmp_path / "lone" / "t.safetensors"
    lone.parent.mkdir()
    save_file(load_file(str(target / "model.safetensors")), str(lone))
    data = tmp_path / "eval.npz"
    _npz(data)
    out = tmp_path / "p.patch"
    err = _create(str(base), str(lone), "-o", str(out), "--check", "--eval", str(data), code=2)
    assert (
        f"--eval needs TARGET to be a Hugging Face model with a config.json; {lone} has none"
        in err["stderr"]
    )
    assert not out.exists()  # refused before anything was written
    err = _create(str(base), str(target), "-o", str(out), "--eval", str(data), code=2)
    assert "--eval needs --check" in err["stderr"] and not out.exists()


def test_eval_without_transformers_names_the_stats_extra(
    clf: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, target = clf
    data = tmp_path / "eval.npz"
    _npz(data)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    out = tmp_path / "p.patch"
    err = _create(str(base), str(target), "-o", str(out), "--check", "--eval", str(data), code=2)
    assert "--eval needs PyTorch and transformers (transformers is not installed)" in err["stderr"]
    assert "pip install 'potluck[stats]'" in err["stderr"] and not out.exists()
