"""Fisher and Gram statistics with PyTorch (``ops.merge.stats_torch``) and ``potluck stats``.

References are independent: closed-form per-example gradients in numpy, XᵀX of hand-collected
layer inputs, the least-squares solution of the joint regression, a hand-written LM loss.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

from potluck.merging import MERGE_METHODS  # noqa: E402
from potluck.ops.merge.stats_torch import fisher_diag, gram_matrices, input_axes  # noqa: E402
from potluck.ops.merge.statsfile import load_stats, stats_for, write_stats  # noqa: E402
from tiny_models import MOVIE_WORDS, save_tiny, tiny_llama  # noqa: E402

F = torch.nn.functional


# ── fisher_diag ─────────────────────────────────────────────────────────────────────────────


def test_fisher_diag_matches_closed_form_per_example_gradients() -> None:
    """Tanh MLP, softmax NLL: ∂/∂logits = p − onehot(y), backpropagated by hand in float64."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    ).double()
    x = torch.randn(7, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    batches = [{"x": x[:4], "y": y[:4]}, {"x": x[4:], "y": y[4:]}]

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="sum")

    got = fisher_diag(model, batches, loss_fn)

    w1, b1 = model[0].weight.detach().numpy(), model[0].bias.detach().numpy()
    w2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    sq = {k: 0.0 for k in ("0.weight", "0.bias", "2.weight", "2.bias")}
    for xn, yn in zip(x.numpy(), y.numpy(), strict=True):
        h = np.tanh(w1 @ xn + b1)
        logits = w2 @ h + b2
        p = np.exp(logits - logits.max())
        p /= p.sum()
        d_logits = p - np.eye(3)[yn]
        d_pre = (w2.T @ d_logits) * (1 - h**2)
        grads = {
            "2.weight": np.outer(d_logits, h),
            "2.bias": d_logits,
            "0.weight": np.outer(d_pre, xn),
            "0.bias": d_pre,
        }
        for k, g in grads.items():
            sq[k] = sq[k] + g**2
    assert sorted(got) == sorted(sq)
    for k in sq:
        np.testing.assert_allclose(got[k], sq[k] / 7, rtol=1e-10, atol=1e-14)
    assert model.training  # left in train mode, as it came


def test_fisher_diag_is_per_example_not_per_batch() -> None:
    """Two examples whose gradients cancel: the batch gradient is 0, the Fisher is not."""
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.0)
    x = torch.tensor([[1.0], [1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0], [-1.0]], dtype=torch.float64)

    def loss_fn(m, b):  # Gaussian NLL up to a constant: ½(y − wx)²
        return 0.5 * ((m(b["x"]) - b["y"]) ** 2).sum()

    got = fisher_diag(model, [{"x": x, "y": y}], loss_fn)
    np.testing.assert_allclose(got["weight"], [[1.0]])  # mean of (−1)² and (+1)²
    assert model.training  # left in its original mode


# ── gram_matrices ───────────────────────────────────────────────────────────────────────────


class TinyTokenModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 3)
        self.up = torch.nn.Linear(3, 4)
        self.down = torch.nn.Linear(4, 2)

    def forward(self, input_ids, attention_mask=None):
        return self.down(torch.relu(self.up(self.embed(input_ids))))


def test_gram_matrices_match_manual_xtx_without_padding() -> None:
    torch.manual_seed(1)
    model = TinyTokenModel().double()
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    batches = [
        {"input_ids": ids[:2], "attention_mask": mask[:2]},
        {"input_ids": ids[2:], "attention_mask": mask[2:]},
    ]
    got = gram_matrices(model, batches)

    emb = model.embed.weight.detach().numpy()
    w_up, b_up = model.up.weight.detach().numpy(), model.up.bias.detach().numpy()
    xs_up, xs_down = [], []
    for row_ids, row_mask in zip(ids.tolist(), mask.tolist(), strict=True):
        for tok, keep in zip(row_ids, row_mask, strict=True):
            if keep:
                e = emb[tok]
                xs_up.append(e)
                xs_down.append(np.maximum(w_up @ e + b_up, 0.0))
    x_up, x_down = np.array(xs_up), np.array(xs_down)
    assert sorted(got) == ["down.weight", "up.weight"]
    np.testing.assert_allclose(got["up.weight"], x_up.T @ x_up, rtol=1e-12)
    np.testing.assert_allclose(got["down.weight"], x_down.T @ x_down, rtol=1e-12)
    assert input_axes(model) == {"up.weight": 1, "down.weight": 1}


def test_gram_of_gpt2_conv1d_has_input_axis_zero() -> None:
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(2)
    model = torch.nn.Sequential(Conv1D(5, 3))  # nf=5 outputs, nx=3 inputs: weight [3, 5]
    x = torch.randn(2, 4, 3)
    got = gram_matrices(model, [{"x": x}], forward=lambda m, b: m(b["x"]))
    flat = x.reshape(-1, 3).double().numpy()
    np.testing.assert_allclose(got["0.weight"], flat.T @ flat, rtol=1e-6)
    assert input_axes(model) == {"0.weight": 0}
    assert tuple(model[0].weight.shape) == (3, 5)


# ── end to end: RegMean of two fine-tunes equals the joint least-squares fit ────────────────


def test_regmean_of_two_finetunes_is_the_joint_least_squares(tmp_path: Path) -> None:
    torch.manual_seed(3)
    base = torch.nn.Linear(5, 2, bias=False).double()
    scales = [torch.tensor([1.0, 2.0, 0.5, 1.0, 1.0]), torch.tensor([0.5, 1.0, 1.0, 3.0, 1.0])]
    data, models, files = [], [], []
    for i, scale in enumerate(scales):
        x = torch.randn(40, 5, dtype=torch.float64) * scale
        target = x @ torch.randn(5, 2, dtype=torch.float64)
        model = torch.nn.Linear(5, 2, bias=False).double()
        model.load_state_dict(base.state_dict())
        with torch.no_grad():  # a short fine-tune on its own task (gradient descent on MSE)
            for _ in range(30):
                residual = model(x) - target
                model.weight -= 0.02 * 2 * residual.T @ x / residual.numel()
        grams = gram_matrices(model, [{"x": x[:25]}, {"x": x[25:]}], lambda m, b: m(b["x"]))
        write_stats(
            tmp_path / f"m{i}.stats",
            "gram",
            grams,
            samples=40,
            tokens=40,
            input_axes=input_axes(model),
        )
        data.append(x.numpy())
        models.append(model.weight.detach().numpy())
        files.append(load_stats(tmp_path / f"m{i}.stats"))
    stats = stats_for(files, "weight", models)
    merged = MERGE_METHODS.get("regmean").merge(
        models, None, None, name="weight", seed=0, stats=stats, alpha=1.0
    )
    x_all = np.vstack(data)
    y_all = np.vstack([x @ w.T for x, w in zip(data, models, strict=True)])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T
    np.testing.assert_allclose(merged, want, rtol=1e-5, atol=1e-6)  # Grams stored as float32
    assert not np.allclose(merged, (models[0] + models[1]) / 2, atol=1e-3)


# ── potluck stats on a tiny Hugging Face model (built here, no downloads) ───────────────────


#: The tiny Llama's config (seed 4); the classifier has three labels.
LLAMA = {"vocab_size": 32, "max_position_embeddings": 32, "pad_token_id": 0, "num_labels": 3}


def _invoke(*args: str) -> dict:
    from click.testing import CliRunner

    import potluck.cli.stats_cmd  # noqa: F401  (registers `stats`)
    from potluck.cli.main import cli

    result = CliRunner().invoke(cli, ["stats", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny(tiny_llama(4, **LLAMA), tmp_path_factory.mktemp("llama"))


def _npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([[1, 5, 7, 9, 3], [2, 4, 6, 0, 0], [8, 8, 1, 2, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    mask[0, 4] = 1
    np.savez(path, input_ids=ids, attention_mask=mask)
    return ids, mask


def test_cli_gram_on_a_tiny_llama(llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import LlamaForCausalLM

    ids, mask = _npz(tmp_path / "data.npz")
    out = tmp_path / "g.stats"
    summary = _invoke("gram", str(llama_dir), "--data", str(tmp_path / "data.npz"), "-o", str(out))
    assert summary["samples"] == 3 and summary["tokens"] == int(mask.sum())
    f = load_stats(out)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert f.kind == "gram" and name in f.names() and "lm_head.weight" in f.names()
    assert f.input_axes[name] == 1
    digest = hashlib.sha256((tmp_path / "data.npz").read_bytes()).hexdigest()
    assert f.data_sha256 == digest == summary["data_sha256"]
    ckpt = load_file(str(llama_dir / "model.safetensors"))
    assert f.model_sha256[name] == hashlib.sha256(ckpt[name].tobytes()).hexdigest()

    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():  # q_proj's input: input_layernorm(embedding), padding dropped
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor(ids)))
    rows = h[torch.tensor(mask).bool()].double().numpy()
    got = f.get(name)
    assert got is not None
    np.testing.assert_allclose(got, rows.T @ rows, rtol=1e-5, atol=1e-5)


def test_cli_fisher_on_a_tiny_llama(llama_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    ids, mask = _npz(tmp_path / "data.npz")
    out = tmp_path / "f.stats"
    args = ["fisher", str(llama_dir), "--data", str(tmp_path / "data.npz"), "-o", str(out)]
    summary = _invoke(*args, "--batch-size", "2", "--max-samples", "2")
    assert summary["task"] == "causal_lm" and summary["samples"] == 2
    f = load_stats(out)

    model = LlamaForCausalLM.from_pretrained(llama_dir).eval()
    param = dict(model.named_parameters())["lm_head.weight"]
    want = torch.zeros_like(param, dtype=torch.float64)
    for n in range(2):  # the sequence's log-likelihood, written out by hand
        logits = model(input_ids=torch.tensor(ids[n : n + 1])).logits[0]
        logp = torch.log_softmax(logits.double(), -1)
        ll = sum(logp[t, ids[n, t + 1]] for t in range(ids.shape[1] - 1) if mask[n, t + 1])
        (g,) = torch.autograd.grad(ll, [param])
        want += g.double() ** 2
    got = f.get("lm_head.weight")
    assert got is not None
    np.testing.assert_allclose(got, (want / 2).numpy(), rtol=2e-4, atol=1e-9)
    assert f.fisher_norm is not None and f.fisher_norm > 0
    assert f.description["fisher"] == "empirical, per-example"


def test_cli_fisher_of_a_classifier_from_jsonl(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    model_dir = save_tiny(tiny_llama(4, classifier=True, **LLAMA), tmp_path / "clf", MOVIE_WORDS)
    rows = [("the movie was good", 0), ("bad plot", 1), ("good good movie", 2)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    out = tmp_path / "f.stats"
    summary = _invoke("fisher", str(model_dir), "--data", str(data), "-o", str(out))
    assert summary["task"] == "classification" and summary["samples"] == 3

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForSequenceClassification.from_pretrained(model_dir).eval()
    param = dict(model.named_parameters())["score.weight"]
    want = torch.zeros_like(param, dtype=torch.float64)
    for text, label in rows:  # one example at a time, no padding at all
        enc = tokenizer(text, return_tensors="pt")
        logp = torch.log_softmax(model(**enc).logits[0].double(), -1)
        (g,) = torch.autograd.grad(logp[label], [param])
        want += g.double() ** 2
    got = load_stats(out).get("score.weight")
    assert got is not None
    np.testing.assert_allclose(got, (want / 3).numpy(), rtol=2e-4, atol=1e-9)


def test_cli_reports_bad_data_as_a_user_error(llama_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import potluck.cli.stats_cmd  # noqa: F401
    from potluck.cli.main import cli

    np.savez(tmp_path / "bad.npz", tokens=np.zeros((2, 3), dtype=np.int64))
    args = ["stats", "gram", str(llama_dir), "--data", str(tmp_path / "bad.npz"), "-o", "x.stats"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "needs an integer 'input_ids' array of shape [N, T]" in result.stderr
    assert result.stdout == ""


def test_cli_refuses_an_unknown_device(llama_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    import potluck.cli.stats_cmd  # noqa: F401
    from potluck.cli.main import cli

    _npz(tmp_path / "data.npz")
    args = ["stats", "gram", str(llama_dir), "--data", str(tmp_path / "data.npz")]
    result = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "g"), "--device", "warp9"])
    assert result.exit_code == 2
    assert "cannot use device 'warp9'" in result.stderr
    assert not (tmp_path / "g").exists()
