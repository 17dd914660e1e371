"""The demo's routing story: two experts composed with Arrow, checked against a naive reference.

The reference recomputes everything in float64 numpy from the story's base weights and the
expert factors read back from the library: each expert's Arrow prototype as the top right
singular vector of the dense ΔW = B·A (``np.linalg.svd``), per token and layer the expert with
the largest |⟨h, p⟩| (ties → lower index), and the forward pass with that expert's ΔW added.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from potluck.ops.compose.library import expert_deltas, find_expert

torch = pytest.importorskip("torch")

from potluck.demo.routing_story import FAMILIES, INPUTS, LAYERS, WORDS, routing_story  # noqa: E402


@pytest.fixture(scope="module")
def story(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    lines: list[str] = []
    res = routing_story(tmp_path_factory.mktemp("demo") / "routing", lines.append)
    res["lines"] = lines
    return res


def _library_deltas(root: Path) -> dict[str, dict[str, np.ndarray]]:
    """{expert: {layer: dense ΔW = B·A in float64}} from the library's patch files."""
    out = {}
    for fam in FAMILIES:
        deltas = expert_deltas(find_expert(root / "experts", f"{fam}@1.0").patch_path)
        out[fam] = {
            n: np.asarray(deltas[f"{n}.weight"].b, np.float64)
            @ np.asarray(deltas[f"{n}.weight"].a, np.float64)
            for n in LAYERS
        }
    return out


def _prototype(delta: np.ndarray) -> np.ndarray:
    vt: np.ndarray = np.linalg.svd(delta)[2]
    row: np.ndarray = vt[0]
    return row


def _reference(
    base: dict[str, np.ndarray], deltas: dict[str, dict[str, np.ndarray]], ids: list[int]
) -> tuple[dict[str, list[str]], np.ndarray]:
    names = list(FAMILIES)
    protos = {n: np.stack([_prototype(deltas[e][n]) for e in names]) for n in LAYERS}
    x = base["embed.weight"].astype(np.float64)[ids]
    routes = {}
    for i, n in enumerate(LAYERS):
        pick = np.abs(x @ protos[n].T).argmax(1)
        routes[n] = [names[k] for k in pick]
        w = base[f"{n}.weight"].astype(np.float64)
        y = (
            np.stack([w @ x[t] + deltas[names[k]][n] @ x[t] for t, k in enumerate(pick)])
            + base[f"{n}.bias"]
        )
        x = np.tanh(y) if i == 0 else y
    return routes, x


def test_library_holds_the_trained_factors(story: dict[str, Any]) -> None:
    root = Path(story["routing_root"])
    for fam in FAMILIES:
        deltas = expert_deltas(find_expert(root / "experts", f"{fam}@1.0").patch_path)
        for n in LAYERS:
            a, b = story["routing_factors"][fam][n]
            got = deltas[f"{n}.weight"]
            assert got.a is not None and got.b is not None
            assert np.array_equal(got.a, a) and np.array_equal(got.b, b)
    base = load_file(str(root / "base.safetensors"))
    assert set(base) == set(story["routing_params"])
    for k, v in base.items():
        assert np.array_equal(v, story["routing_params"][k])


def test_routes_and_outputs_match_the_naive_reference(story: dict[str, Any]) -> None:
    root = Path(story["routing_root"])
    base = load_file(str(root / "base.safetensors"))
    deltas = _library_deltas(root)
    for text in INPUTS:
        ids = [1 + WORDS.index(w) for w in text.split()]
        routes, out = _reference(base, deltas, ids)
        got = story["routing"][text]
        assert got["routes"] == routes, text
        np.testing.assert_allclose(got["output"], out, rtol=1e-4, atol=1e-5)


def test_each_word_goes_to_its_own_family_expert(story: dict[str, Any]) -> None:
    family = {w: f for f, ws in FAMILIES.items() for w in ws}
    for text in INPUTS:
        want = [family[w] for w in text.split()]
        for n in LAYERS:
            assert story["routing"][text]["routes"][n] == want, (text, n)
    assert story["routing_agree"] == story["routing_total"] == 22
    assert "  'teal fox'             teal→colours/colours  fox→animals/animals" in story["lines"]
    assert story["lines"][-1].startswith("  22/22 token routings went to the word's own family")


def test_pure_sentence_equals_base_plus_its_expert(story: dict[str, Any]) -> None:
    """The whole 'red green blue' goes through the colours expert only: the same as the base
    with the colours patch's ΔW added to every adapted weight (no routing)."""
    root = Path(story["routing_root"])
    base = load_file(str(root / "base.safetensors"))
    d = _library_deltas(root)["colours"]
    x = base["embed.weight"].astype(np.float64)[
        [1 + WORDS.index(w) for w in ("red", "green", "blue")]
    ]
    x = np.tanh(x @ (base["layer0.weight"] + d["layer0"]).T + base["layer0.bias"])
    x = x @ (base["layer1.weight"] + d["layer1"]).T + base["layer1.bias"]
    got = story["routing"]["red green blue"]["output"]
    np.testing.assert_allclose(got, x, rtol=1e-4, atol=1e-5)
