"""Scales of sign-coded tensors tuned on ``--eval`` data (``ops.patch.tune_scales``).

References: the rescaled payload against a float64 loop (``SignScaledCodec.rescaled``); the
distilled BitDelta scale and ComPEFT's α against the closed form where only the classifier
matrix changed (the logits are then linear in the scale: a quadratic with a known minimum); the
recorded loss against the outputs of the applied patch run through transformers by hand. Tiny
random BERTs built here (no downloads).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from potluck.codecs import get_codec
from potluck.codecs.base import payload_nbytes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402

import potluck.cli.patch_cmd  # noqa: E402, F401  (registers `patch`)
from potluck.cli.main import cli  # noqa: E402
from potluck.ops.patch.create import create_patch  # noqa: E402
from potluck.ops.patch.fileformat import read_patch  # noqa: E402
from potluck.ops.patch.tune_scales import ALPHAS, TuneSettings  # noqa: E402
from tiny_models import MOVIE_WORDS, save_tiny, tiny_bert  # noqa: E402

CLS = "classifier.weight"


@pytest.mark.parametrize(
    ("codec", "params"),
    [("bitdelta", {}), ("bitdelta", {"scales": "row"}), ("ternary", {"density": 0.3})],
)
def test_rescaled_payload_is_signs_times_the_new_scales(codec: str, params: dict) -> None:
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 7)).astype(np.float32)
    new = base + (0.01 * rng.standard_normal((5, 7))).astype(np.float32)
    c = get_codec(codec)
    p = c.encode(new, base, name="w", seed=0, **params)
    signs, scales = c.sign_parts(p, base)  # type: ignore[attr-defined]
    want_scales = np.linspace(0.5, 2.0, scales.size) * scales.astype(np.float64)
    q = c.rescaled(p, want_scales, new, base)  # type: ignore[attr-defined]
    assert payload_nbytes(q) == payload_nbytes(p) and q.meta == p.meta
    # reference: a float64 loop over the groups, stored scales rounded to the payload dtype
    s32 = want_scales.astype(np.float32).astype(np.float64)
    ref = np.empty(signs.shape)
    for g in range(signs.shape[0]):
        for j in range(signs.shape[1]):
            ref[g, j] = float(signs[g, j]) * s32[g]
    delta_hat = c.decode(q, base).astype(np.float64) - base.astype(np.float64)
    np.testing.assert_allclose(delta_hat.reshape(-1), ref.reshape(-1), rtol=0, atol=1e-6)
    true = new.astype(np.float64) - base
    err = np.sqrt(np.sum((ref.reshape(true.shape) - true) ** 2)) / np.sqrt(np.sum(true**2))
    assert q.error is not None and q.error.relative_error == pytest.approx(err, rel=1e-5)
    with pytest.raises(ValueError):
        c.rescaled(p, np.full(scales.size + 1, 0.1), new, base)  # type: ignore[attr-defined]


def _eval_npz(path: Path, n: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    ids = rng.integers(1, len(MOVIE_WORDS), size=(n, 6))
    ids[::3, 4:] = 0
    data = {"input_ids": ids.astype(np.int64), "attention_mask": (ids != 0).astype(np.int64)}
    np.savez(path, **data)
    return data


def _classifier_pair(
    root: Path, seed: int, labels: int, change: Callable[[Any, Any], None], n: int
) -> tuple[Path, Path, Path]:
    """BASE and TARGET tiny BERT classifiers (TARGET: ``change(model, generator)`` applied to
    BASE's weights, under no_grad) in ``root``, and ``n`` eval inputs."""
    config = {"hidden_size": 16, "num_hidden_layers": 1, "pad_token_id": 0, "num_labels": labels}
    model = tiny_bert(seed, vocab_size=len(MOVIE_WORDS), classifier=True, **config)
    base = save_tiny(model, root / "base", MOVIE_WORDS)
    with torch.no_grad():
        change(model, torch.Generator().manual_seed(seed + 2))
    target = save_tiny(model, root / "target", MOVIE_WORDS)
    _eval_npz(root / "eval.npz", n=n)
    return base, target, root / "eval.npz"


def _head_change(model: Any, gen: Any) -> None:
    w = model.classifier.weight
    w += 0.3 * torch.randn(w.shape, generator=gen) + 0.2 * w.abs().mean()


def _dense_change(model: Any, gen: Any) -> None:
    for _name, p in sorted(model.named_parameters()):
        if p.ndim == 2:
            p += 0.05 * torch.randn(p.shape, generator=gen)


@pytest.fixture(scope="module")
def head_only(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """BASE and TARGET classifiers differing only in ``classifier.weight``, and eval inputs."""
    return _classifier_pair(tmp_path_factory.mktemp("tune"), 0, 4, _head_change, 12)


def _features(target: Path, data: Path) -> np.ndarray:
    """[N, H] float64 inputs of the classifier (pooler output) of TARGET's model."""
    model = transformers.AutoModelForSequenceClassification.from_pretrained(target).eval()
    arrays = dict(np.load(data))
    with torch.no_grad():
        out = model.bert(**{k: torch.tensor(v) for k, v in arrays.items()})
    return out.pooler_output.double().numpy()


def _weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _closed_form(base: Path, target: Path, data: Path) -> tuple[np.ndarray, np.ndarray]:
    """(D h, S h) per example: the logits' gap to TARGET is D h − α S h for scale α."""
    h = _features(target, data)
    d = _weights(target)[CLS].astype(np.float64) - _weights(base)[CLS].astype(np.float64)
    s = np.where(d >= 0, 1.0, -1.0)
    return h @ d.T, h @ s.T


def test_distilled_bitdelta_scale_is_the_closed_form_minimum(
    head_only: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, target, data = head_only
    dh, sh = _closed_form(base, target, data)
    alpha_star = float(np.sum(dh * sh) / np.sum(sh * sh))
    loss = lambda a: float(np.mean((dh - a * sh) ** 2))  # noqa: E731
    tune = TuneSettings(str(data), steps=300, batch_size=64, threads=1)
    info = create_patch(base, target, tmp_path / "p", default_codec="bitdelta", tune=tune)
    assert info.scales is not None and info.scales.tensors == [CLS]
    scale = float(read_patch(tmp_path / "p").payloads[CLS].arrays["scales"][0])
    start = float(np.abs(_weights(target)[CLS] - _weights(base)[CLS]).astype(np.float64).mean())
    assert abs(np.log(alpha_star / start)) > 0.1  # the least-squares scale is not the answer
    assert scale == pytest.approx(alpha_star, rel=0.02)
    assert info.scales.loss_before == pytest.approx(loss(start), rel=1e-4)
    assert loss(alpha_star) <= info.scales.loss_after <= 1.001 * loss(alpha_star)


def test_compeft_alpha_is_the_best_of_the_grid(
    head_only: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, target, data = head_only
    dh, _ = _closed_form(base, target, data)
    h = _features(target, data)
    plain = create_patch(base, target, tmp_path / "plain", default_codec="ternary")
    p0 = read_patch(tmp_path / "plain").payloads[CLS]
    signs, (s0,) = get_codec("ternary").sign_parts(p0, _weights(base)[CLS])  # type: ignore[attr-defined]
    th = h @ signs.reshape(_weights(base)[CLS].shape).astype(np.float64).T
    losses = {a: float(np.mean((dh - a * float(s0) * th) ** 2)) for a in ALPHAS}
    best = min(ALPHAS, key=lambda a: (losses[a], ALPHAS.index(a)))
    tune = TuneSettings(str(data), steps=0, batch_size=64, threads=1)
    info = create_patch(base, target, tmp_path / "p", default_codec="ternary", tune=tune)
    assert info.scales is not None and info.scales.alpha == best != 1.0
    scale = float(read_patch(tmp_path / "p").payloads[CLS].arrays["scale"][0])
    assert scale == pytest.approx(best * float(s0), rel=1e-6)
    assert info.scales.loss_after == pytest.approx(losses[best], rel=1e-4)
    assert info.size > plain.size  # the same arrays, and the record in the description


def _logits(model_dir: Path, data: Path) -> np.ndarray:
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    arrays = dict(np.load(data))
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in arrays.items()}).logits.double().numpy()


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """BASE and TARGET classifiers, every matrix changed, and eval inputs."""
    return _classifier_pair(tmp_path_factory.mktemp("tune_dense"), 1, 3, _dense_change, 16)


def _cli(*args: str) -> dict:
    res = CliRunner().invoke(cli, ["patch", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_cli_tuned_bitdelta_patch_has_the_recorded_output_loss(
    dense: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, target, data = dense
    rules = ["--codec", "bitdelta", "--rule", "*LayerNorm*=exact_xor", "--rule", "*.bias=exact_xor"]
    common = ["create", str(base), str(target), *rules, "--eval", str(data), "--eval-max", "8"]
    out = _cli(*common, "-o", str(tmp_path / "a.patch"), "--distill-steps", "40")
    again = _cli(*common, "-o", str(tmp_path / "b.patch"), "--distill-steps", "40")
    assert (tmp_path / "a.patch").read_bytes() == (tmp_path / "b.patch").read_bytes()
    tuned = out["scales_tuned"]
    assert tuned["kept"] and tuned["samples"] == 8 and tuned["tensors"] == len(tuned["tuned"])
    assert again["scales_tuned"]["loss_after"] == tuned["loss_after"]
    assert tuned["loss_after"] < tuned["loss_before"]
    # reference: the applied patch and TARGET run by transformers on the same 8 inputs
    res = CliRunner().invoke(
        cli, ["patch", "apply", str(base), str(tmp_path / "a.patch"), "-o", str(tmp_path / "m")]
    )
    assert res.exit_code == 0, res.output
    sub = tmp_path / "eval8.npz"
    np.savez(sub, **{k: v[:8] for k, v in np.load(data).items()})
    got, want = _logits(tmp_path / "m", sub), _logits(target, sub)
    assert float(np.mean((got - want) ** 2)) == pytest.approx(tuned["loss_after"], rel=1e-4)
    info = _cli("info", str(tmp_path / "a.patch"))
    assert info["description"]["scales_tuned"]["loss_after"] == tuned["loss_after"]
    # without tuning: the very patch --eval-less create writes
    _cli(*common, "-o", str(tmp_path / "c.patch"), "--no-tune-scales", "--check")
    plain = ["create", str(base), str(target), *rules, "-o", str(tmp_path / "d.patch")]
    _cli(*plain)
    assert (tmp_path / "c.patch").read_bytes() == (tmp_path / "d.patch").read_bytes()


def test_budget_with_eval_tunes_only_the_sign_scales_and_fits(
    dense: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, target, data = dense
    common = ["create", str(base), str(target), "--budget", "16000", "--eval", str(data)]
    tuned = _cli(*common, "-o", str(tmp_path / "t.patch"))
    assert tuned["size"] <= 16000 and tuned["scales_tuned"]["kept"]
    signs = [n for n, t in tuned["tensors"].items() if t["codec"] in ("bitdelta", "ternary")]
    assert signs and sorted(signs) == tuned["scales_tuned"]["tuned"]
    # reference: each tensor encoded again by its codec with the parameters in its meta
    old, new = _weights(base), _weights(target)
    for name, p in read_patch(tmp_path / "t.patch").payloads.items():
        codec = get_codec(p.codec)
        params = {q.name: p.meta[q.name] for q in codec.params if q.name in p.meta}
        again = codec.encode(new[name], old[name], name=name, seed=0, **params)
        for key, arr in p.arrays.items():
            same = np.array_equal(arr, again.arrays[key])
            assert same == (name not in signs or key not in ("scale", "scales")), (name, key)


def test_tuning_options_and_eval_refusals(dense: tuple[Path, Path, Path], tmp_path: Path) -> None:
    base, target, data = dense
    out = tmp_path / "x.patch"
    args = ["patch", "create", str(base), str(target), "-o", str(out)]
    runner = CliRunner()
    res = runner.invoke(cli, [*args, "--codec", "bitdelta", "--distill-steps", "5"])
    assert res.exit_code == 2 and "--distill-steps needs --eval" in res.output
    res = runner.invoke(cli, [*args, "--eval", str(data)])
    assert res.exit_code == 2
    assert "--eval needs --check, --budget/--max-error" in res.output
    assert "or a sign codec (bitdelta, ternary) whose scales it tunes" in res.output
    res = runner.invoke(
        cli, [*args, "--codec", "bitdelta", "--eval", str(data), "--no-tune-scales"]
    )
    assert res.exit_code == 2 and "--eval needs --check" in res.output
    res = runner.invoke(
        cli, [*args, "--codec", "bitdelta", "--eval", str(data), "--distill-steps", "-1"]
    )
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert not out.exists()


def test_output_in_a_missing_folder_is_refused_before_any_work(
    dense: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    base, target, data = dense
    out = tmp_path / "no-such-dir" / "p.patch"
    for extra in ([], ["--eval", str(data)]):
        args = ["patch", "create", str(base), str(target), "-o", str(out), "--codec", "bitdelta"]
        res = CliRunner().invoke(cli, [*args, *extra])
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output
        assert f"cannot write {out}: {out.parent} does not exist" in res.output
        assert not out.parent.exists()
