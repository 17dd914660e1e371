"""adamerging (Yang et al. 2024, layer-wise): the merge step and the objective against naive
float64 references, and learning on tiny BERT classifiers from unlabelled JSONL."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors.numpy import load_file

from potluck.cli.main import cli
from potluck.merging import MERGE_METHODS
from potluck.merging.adamerging import layerwise_merge, prediction_entropy
from potluck.ops.merge.adamerging import weight_conditions
from potluck.ops.merge.config import evaluate_setting

WORDS = ["[PAD]", "[UNK]", "good", "bad", "fine", "day", "night", "cat", "dog", "red"]


def test_merge_step_and_entropy_match_naive_float64(rng: np.random.Generator) -> None:
    base = rng.normal(size=(3, 4))
    models = base + rng.normal(size=(2, 3, 4))
    lam = np.array([0.25, 0.7])
    want = np.array(
        [[base[i, j] + sum(lam[t] * (models[t, i, j] - base[i, j]) for t in range(2))
          for j in range(4)] for i in range(3)]
    )  # fmt: skip
    np.testing.assert_allclose(layerwise_merge(base, models - base, lam), want, atol=1e-15)
    got = MERGE_METHODS.get("adamerging").merge(list(models), base, list(lam), name="w", seed=0)
    np.testing.assert_allclose(got, want, atol=1e-15)
    unlearned = MERGE_METHODS.get("adamerging").merge(list(models), base, None, name="w", seed=0)
    np.testing.assert_allclose(unlearned, layerwise_merge(base, models - base, np.full(2, 0.3)))
    logits = np.array([[0.0, 0.0], [math.log(3.0), 0.0]])
    # H(½, ½) = ln 2; H(¾, ¼) = −¾ ln ¾ − ¼ ln ¼
    h = (math.log(2) + (-0.75 * math.log(0.75) - 0.25 * math.log(0.25))) / 2
    assert prediction_entropy(logits) == pytest.approx(h, rel=1e-15)


def test_weight_conditions_pick_each_tensor_exactly() -> None:
    coeffs = {"l.1.w": 0.1, "l.11.w": 0.2, "a.l.1.w": 0.3, "l.1.w.x": 0.4}
    conds = [*weight_conditions(coeffs), {"value": 0.9}]
    for name, value in coeffs.items():
        assert evaluate_setting(conds, name, 0.0) == value
    assert evaluate_setting(conds, "classifier.weight", 0.0) == 0.9


def _cli(cwd: Path, *args: str) -> Result:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT classifier as the base, two fine-tunes (moved encoder, own heads), data."""
    torch = pytest.importorskip("torch")
    from tests.tiny_models import save_tiny, tiny_bert

    root = tmp_path_factory.mktemp("ada")
    base = tiny_bert(0, vocab_size=len(WORDS), classifier=True, num_labels=3)
    save_tiny(base, root / "base", WORDS)
    gen = torch.Generator().manual_seed(1)
    for t in range(2):
        ft = tiny_bert(0, vocab_size=len(WORDS), classifier=True, num_labels=3)
        with torch.no_grad():
            for name, p in ft.named_parameters():
                p.add_(
                    torch.randn(p.shape, generator=gen) * (0.5 if "classifier" in name else 0.05)
                )
        save_tiny(ft, root / f"task{t}", WORDS)
        rows = [
            {"text": " ".join(WORDS[2 + (i * 3 + k + t) % 8] for k in range(4))} for i in range(8)
        ]
        (root / f"d{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _learned(yaml_text: str) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for line in yaml_text.splitlines():
        if line.startswith("# {"):
            out.update(json.loads(line[2:]))
    return out


def _entropies(root: Path, encoders: list[dict[str, np.ndarray]], t: int) -> list[float]:
    """Task t's mean prediction entropy on its first 4 texts under each encoder."""
    import torch
    import transformers

    model = transformers.AutoModelForSequenceClassification.from_pretrained(root / f"task{t}")
    tok = transformers.AutoTokenizer.from_pretrained(root / f"task{t}")
    texts = [json.loads(x)["text"] for x in (root / f"d{t}.jsonl").read_text().splitlines()]
    batch = tok(texts[:4], return_tensors="pt", padding=True)
    out = []
    for encoder in encoders:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in encoder.items()}, strict=False)
        with torch.no_grad():
            out.append(prediction_entropy(model.eval()(**batch).logits.double().numpy()))
    return out


def test_learns_layerwise_coefficients_that_lower_entropy(classifiers: Path) -> None:
    root = classifiers
    res = _cli(root, "merge", "--method", "adamerging", "--base", "base", "task0", "task1",
               "-o", "OUT", "-p", "data=[d0.jsonl, d1.jsonl]", "-p", "steps=4", "-p", "lr=0.05",
               "-p", "batch_size=4")  # fmt: skip
    assert res.exit_code == 0, res.output
    learned = _learned((root / "OUT" / "potluck-merge.yaml").read_text())
    assert sorted(learned) == ["task0", "task1"]
    base = load_file(str(root / "base" / "model.safetensors"))
    fts = [load_file(str(root / f"task{t}" / "model.safetensors")) for t in range(2)]
    merged = load_file(str(root / "OUT" / "model.safetensors"))
    lam = {
        t: {c["filter"]: c["value"] for c in learned[f"task{t}"] if "filter" in c} for t in (0, 1)
    }
    assert sorted(lam[0]) == sorted(n for n in base if n.startswith("bert."))
    assert any(v != 0.3 for v in lam[0].values())  # moved from the prior
    init: dict[str, np.ndarray] = {}
    for name in lam[0]:
        coeffs = np.array([lam[0][name], lam[1][name]])
        taus = np.stack([ft[name].astype(np.float64) - base[name] for ft in fts])
        want = layerwise_merge(base[name].astype(np.float64), taus, coeffs).astype(np.float32)
        np.testing.assert_array_equal(merged[name], want)
        init[name] = layerwise_merge(
            base[name].astype(np.float64), taus, np.array([0.3, 0.3])
        ).astype(np.float32)
    learned_encoder = {n: merged[n] for n in lam[0]}
    pairs = [_entropies(root, [init, learned_encoder], t) for t in (0, 1)]
    before, after = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    assert after < before


def test_refused_before_loading(classifiers: Path, tmp_path: Path) -> None:
    root = classifiers
    res = _cli(root, "merge", "--method", "adamerging", "--base", "base", "task0", "task1",
               "-o", str(tmp_path / "o"), "-p", "data=d0.jsonl")  # fmt: skip
    assert res.exit_code != 0
    assert "give one data file per model (2), got 1" in res.output
    res = _cli(root, "merge", "--method", "adamerging", "--base", "base", "task0", "task1",
               "-o", str(tmp_path / "o"), "-p", "data=[d0.jsonl, missing.jsonl]")  # fmt: skip
    assert res.exit_code != 0
    assert "data file 'missing.jsonl' of 'task1' does not exist" in res.output
    res = _cli(root, "merge", "--method", "adamerging", "--base", "base/model.safetensors",
               "task0/model.safetensors", "-o", str(tmp_path / "o"),
               "-p", "data=[d0.jsonl]")  # fmt: skip
    assert res.exit_code != 0
    assert "needs each model's own classification head" in res.output
    assert not (tmp_path / "o").exists()


def _adam_reference(
    x: list[list[np.ndarray]],
    heads: list[np.ndarray],
    theta0: dict[str, np.ndarray],
    taus: list[dict[str, np.ndarray]],
    steps: int,
    lr: float,
    init: float,
) -> np.ndarray:
    """Layer-wise AdaMerging in float64 numpy with the gradient in closed form, for the model
    logits = (x·Wᵀ + b)·Aₜᵀ (tensors W, b merged; Aₜ task t's head): ∂H/∂z = −p ⊙ (log p + H),
    ∂z/∂λ_{s,W} = (x·τ_{s,W}ᵀ)·Aₜᵀ, ∂z/∂λ_{s,b} = τ_{s,b}·Aₜᵀ; then Adam (β 0.9 / 0.999,
    ε 1e-8, bias-corrected) and the clamp to [0, 1]."""
    names = list(theta0)
    lam = np.full((len(taus), len(names)), init)
    m, v = np.zeros_like(lam), np.zeros_like(lam)
    for k in range(1, steps + 1):
        w = {n: theta0[n] + sum(lam[s, i] * taus[s][n] for s in range(len(taus)))
             for i, n in enumerate(names)}  # fmt: skip
        g = np.zeros_like(lam)
        for t, head in enumerate(heads):
            xb = x[t][(k - 1) % len(x[t])]
            z = (xb @ w["w"].T + w["b"]) @ head.T
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            h = -(p * np.log(p)).sum(-1, keepdims=True)
            dz = -p * (np.log(p) + h) / len(xb)
            for s, tau in enumerate(taus):
                g[s, 0] += (dz * ((xb @ tau["w"].T) @ head.T)).sum()
                g[s, 1] += (dz * (tau["b"] @ head.T)).sum()
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        lam = lam - lr * (m / (1 - 0.9**k)) / (np.sqrt(v / (1 - 0.999**k)) + 1e-8)
        lam = np.clip(lam, 0.0, 1.0)
    return lam


def test_learn_layerwise_matches_closed_form_adam(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    from potluck.ops.merge.adamerging import learn_layerwise

    theta0 = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=4)}
    taus = [{n: rng.normal(size=a.shape) for n, a in theta0.items()} for _ in range(2)]
    heads = [rng.normal(size=(3, 4)), rng.normal(size=(2, 4))]
    x = [[rng.normal(size=(5, 3)) for _ in range(2)] for _ in range(2)]

    def forward(head: np.ndarray) -> Any:
        a = torch.from_numpy(head).float()
        return lambda p, batch: (batch["x"] @ p["w"].T + p["b"]) @ a.T

    def f32(d: dict[str, np.ndarray]) -> dict[str, Any]:
        return {n: torch.from_numpy(a).float() for n, a in d.items()}

    got = learn_layerwise(
        f32(theta0), [f32(t) for t in taus], [forward(h) for h in heads],
        [[{"x": torch.from_numpy(b).float()} for b in xt] for xt in x],
        steps=4, lr=0.3, init=0.5,
    )  # fmt: skip
    want = _adam_reference(x, heads, theta0, taus, steps=4, lr=0.3, init=0.5)
    assert got.shape == (2, 2)
    assert ((want == 0.0) | (want == 1.0)).any() and ((want > 0) & (want < 1)).any()
    np.testing.assert_allclose(got, want, atol=2e-5)
