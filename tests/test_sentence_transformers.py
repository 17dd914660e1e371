"""Issue 15, item 9 with sentence-transformers itself: the outputs of `potluck merge`,
`patch apply` and `peft apply` on a sentence-transformers layout load with
``SentenceTransformer(path)`` and encode exactly as sentence-transformers does with the same
weights put into the original model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from test_first_hour_models import POS, _ok, hf  # noqa: F401 (hf is the shared fixture)

torch = pytest.importorskip("torch")
st = pytest.importorskip("sentence_transformers")

SENTENCES = ["good movie", "bad plot", "movie"]


def _encode(model: Any) -> np.ndarray:
    with torch.inference_mode():
        out = model.encode(SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    assert isinstance(out, np.ndarray)
    return out


def _reference(orig: Path, weights: Path) -> np.ndarray:
    """Embeddings of the original model with the weights of ``weights`` loaded into it."""
    from safetensors.torch import load_file

    model = st.SentenceTransformer(str(orig), device="cpu")
    result = model[0].auto_model.load_state_dict(load_file(str(weights)), strict=False)
    assert result.missing_keys == []
    assert set(result.unexpected_keys) <= {POS}
    return _encode(model)


def test_outputs_load_as_sentence_transformers_and_encode_as_it_does(hf: Path) -> None:  # noqa: F811
    torch.set_num_threads(1)
    orig = hf / "orig"
    _ok("merge", "--method", "linear", orig, hf / "ft1", "-o", hf / "stx_merge")
    _ok("patch", "apply", orig, hf / "q.patch", "-o", hf / "stx_patch")
    _ok("peft", "export", hf / "q.patch", hf / "stx_adapter", "--base-model", "orig")
    _ok("peft", "apply", orig, hf / "stx_adapter", hf / "stx_peft")
    plain = _encode(st.SentenceTransformer(str(orig), device="cpu"))
    assert plain.shape == (len(SENTENCES), 16)
    for name in ("stx_merge", "stx_patch", "stx_peft"):
        out = hf / name
        got = _encode(st.SentenceTransformer(str(out), device="cpu"))
        want = _reference(orig, out / "model.safetensors")
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert not np.array_equal(got, plain), name  # the weights did change
        norms = np.linalg.norm(got, axis=1)  # the Normalize module of the layout is there
        np.testing.assert_allclose(norms, 1.0, rtol=1e-5, err_msg=name)
