"""Expert libraries, manifests and lockfiles (no torch)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from modular_helpers import (
    dense_payload,
    ia3_payload,
    lowrank_payload,
    random_factors,
    save_st,
    write_expert,
)
from potluck.codecs import get_codec
from potluck.errors import FormatError, IntegrityError, UserError
from potluck.modular import arrow_prototype
from potluck.ops.compose.library import (
    AddOptions,
    add_expert,
    expert_deltas,
    find_expert,
    list_experts,
    load_artifact,
    read_safetensors,
    verify_library,
)
from potluck.ops.compose.manifest import (
    export_mixture,
    load_composition,
    lock_bytes,
    lock_manifest,
    read_manifest,
    write_lock,
)
from potluck.ops.models.sources import open_path
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.fileformat import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256

Q, QB, V = "l0.q.weight", "l0.q.bias", "l1.v.weight"


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def base(tmp_path: Path, rng: np.random.Generator) -> Path:
    tensors = {
        Q: rng.normal(size=(6, 8)).astype(np.float32),
        QB: rng.normal(size=6).astype(np.float32),
        V: rng.normal(size=(6, 8)).astype(np.float32),
    }
    return save_st(tmp_path / "base.safetensors", tensors)


def _expert(base: Path, out: Path, rng: np.random.Generator, r: int = 2) -> dict[str, tuple]:
    f = {Q: random_factors(rng, r, 8, 6), V: random_factors(rng, r, 8, 6)}
    payloads = {n: lowrank_payload(a, b, (6, 8)) for n, (a, b) in f.items()}
    payloads[QB] = dense_payload(rng.normal(size=6).astype(np.float32) * 0.1)
    write_expert(base, out, payloads)
    return f


def test_add_list_show_with_arrow(tmp_path: Path, base: Path, rng: np.random.Generator) -> None:
    f = _expert(base, tmp_path / "a.patch", rng)
    lib = tmp_path / "lib"
    opts = AddOptions(tags=["sst2"], license="mit", evals={"sst2/acc": 0.9}, arrow=True)
    rec = add_expert(lib, tmp_path / "a.patch", "sent", "1.0", base=str(base), options=opts)
    assert json.loads((lib / "library.json").read_text()) == {"potluck_library": "1"}
    d = lib / "experts" / "sent" / "1.0"
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == [
        "artifacts/arrow.safetensors",
        "expert.json",
        "expert.patch",
    ]
    assert (d / "expert.patch").read_bytes() == (tmp_path / "a.patch").read_bytes()
    meta = json.loads((d / "expert.json").read_text())
    assert meta["kind"] == "lowrank" and meta["tags"] == ["sst2"] and meta["license"] == "mit"
    assert meta["patch"]["tensors"] == [QB, Q, V] and meta["evals"] == {"sst2/acc": 0.9}
    protos = load_artifact(rec, "arrow")
    assert sorted(protos) == [Q, V]
    for name, (a, b) in f.items():
        want = arrow_prototype(a.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(protos[name], want, atol=1e-6)
    add_expert(lib, tmp_path / "a.patch", "sent", "1.10", options=AddOptions(tags=["sst2"]))
    assert [r.ref for r in list_experts(lib)] == ["sent@1.0", "sent@1.10"]
    assert find_expert(lib, "sent@<1.5").version == "1.0"
    assert find_expert(lib, "sent").version == "1.10"
    with pytest.raises(UserError, match=r"expert sent@1\.0 is already in the library"):
        add_expert(lib, tmp_path / "a.patch", "sent", "1.0")
    with pytest.raises(UserError, match=r"expert sent@1\.0 is already in the library"):
        add_expert(lib, tmp_path / "a.patch", "sent", "1.0.0")
    with pytest.raises(UserError, match="invalid version 'v2'"):
        add_expert(lib, tmp_path / "a.patch", "sent", "v2")
    assert verify_library(lib, base=open_path(base)) == []


def test_non_expert_patches_and_wrong_base_are_refused(
    tmp_path: Path, base: Path, rng: np.random.Generator
) -> None:
    with open_path(base) as src:
        w = src.read(Q)
    xor = get_codec("exact_xor").encode(w + 1, w, name=Q, seed=0)
    write_patch(
        tmp_path / "x.patch", PatchContents({Q: xor}, {Q: tensor_sha256(w)}, {}, [], [], {})
    )
    lib = tmp_path / "lib"
    with pytest.raises(UserError, match=r"tensor 'l0\.q\.weight' uses codec 'exact_xor'"):
        add_expert(lib, tmp_path / "x.patch", "bad", "1")
    assert not lib.exists()  # nothing is left, not even an empty directory
    _expert(base, tmp_path / "a.patch", rng)
    with open_path(base) as src:
        tensors = {n: src.read(n).copy() for n in src.names()}
    other = save_st(tmp_path / "other.safetensors", {**tensors, Q: w + 1})
    with pytest.raises(
        IntegrityError, match=r"expert sent@1 was made for another base: 'l0\.q\.weight' differ"
    ):
        add_expert(lib, tmp_path / "a.patch", "sent", "1", base=str(other))
    with pytest.raises(UserError, match="Arrow prototypes need LoRA experts"):
        scales = np.linspace(0.5, 1.5, 6).astype(np.float32)
        write_expert(base, tmp_path / "i.patch", {Q: ia3_payload(scales, (6, 8), 0)})
        add_expert(lib, tmp_path / "i.patch", "ia", "1", options=AddOptions(arrow=True))


def test_gates_and_stale_artifacts(tmp_path: Path, base: Path, rng: np.random.Generator) -> None:
    lib = tmp_path / "lib"
    _expert(base, tmp_path / "a.patch", rng)
    _expert(base, tmp_path / "b.patch", rng)
    gates = save_st(
        tmp_path / "g.safetensors", {Q: np.ones(8, np.float32), V: np.arange(8, dtype=np.float32)}
    )
    opts = AddOptions(arrow=True, gates=str(gates))
    ra = add_expert(lib, tmp_path / "a.patch", "a", "1", options=opts)
    rb = add_expert(lib, tmp_path / "b.patch", "b", "1", options=AddOptions(arrow=True))
    assert load_artifact(ra, "phatgoose")[V].tolist() == list(range(8))
    bad = save_st(tmp_path / "bad.safetensors", {Q: np.ones(5, np.float32)})
    with pytest.raises(
        UserError, match=r"gate 'l0\.q\.weight' has 5 entries, the weight has 8 inputs"
    ):
        add_expert(lib, tmp_path / "a.patch", "a", "2", options=AddOptions(gates=str(bad)))
    # b's prototypes copied over a's (and the recorded hash updated): stale, named
    art = ra.path / "artifacts" / "arrow.safetensors"
    shutil.copyfile(rb.path / "artifacts" / "arrow.safetensors", art)
    meta = json.loads((ra.path / "expert.json").read_text())
    from potluck.fileio import file_sha256

    meta["artifacts"]["arrow"]["sha256"] = file_sha256(art)
    (ra.path / "expert.json").write_text(json.dumps(meta))
    ra = find_expert(lib, "a")
    with pytest.raises(IntegrityError, match="expert a@1: the arrow artifact is stale"):
        load_artifact(ra, "arrow")
    problems = verify_library(lib)
    assert [(p.expert, p.message.split(" (")[0]) for p in problems] == [
        ("a@1", "the arrow artifact is stale")
    ]
    # a changed patch: hash mismatch reported for that expert only
    shutil.copyfile(tmp_path / "b.patch", rb.path / "expert.patch")
    shutil.copyfile(tmp_path / "a.patch", rb.path / "expert.patch")
    problems = verify_library(lib, refs=["b"])
    assert len(problems) == 1 and problems[0].expert == "b@1"
    assert problems[0].message.startswith("patch sha256 ")


MANIFEST = """\
base = "base.safetensors"
library = "lib"
aggregation = "output"
experts = ["b@>=1,<2", "a@*"]

[router]
strategy = "{strategy}"
top_k = 2
layers = ["l0.*"]
{extra}
"""


def _library(tmp_path: Path, base: Path, rng: np.random.Generator) -> dict[str, dict]:
    lib = tmp_path / "lib"
    out = {}
    for name, versions in (("a", ["1"]), ("b", ["1.0", "1.5", "2.0"])):
        for v in versions:
            f = _expert(base, tmp_path / f"{name}{v}.patch", rng)
            add_expert(lib, tmp_path / f"{name}{v}.patch", name, v, options=AddOptions(arrow=True))
            out[f"{name}@{v}"] = f
    return out


def test_lock_is_deterministic_and_resolves(
    tmp_path: Path, base: Path, rng: np.random.Generator
) -> None:
    _library(tmp_path, base, rng)
    m = tmp_path / "comp.toml"
    m.write_text(MANIFEST.format(strategy="arrow", extra="temperature = 0.5"))
    lock = lock_manifest(m)
    assert lock_bytes(lock) == lock_bytes(lock_manifest(m))
    write_lock(tmp_path / "comp.lock", lock)
    write_lock(tmp_path / "again.lock", lock_manifest(m))
    assert (tmp_path / "comp.lock").read_bytes() == (tmp_path / "again.lock").read_bytes()
    assert [(e["name"], e["version"], e["constraint"]) for e in lock["experts"]] == [
        ("b", "1.5", ">=1,<2"),
        ("a", "1", "*"),
    ]
    with open_path(base) as src:
        assert lock["base"]["tensors"] == {n: tensor_sha256(src.read(n)) for n in (Q, QB, V)}
    b15 = find_expert(tmp_path / "lib", "b@==1.5")
    assert lock["experts"][0]["sha256"] == b15.sha256
    assert lock["experts"][0]["artifacts"] == {"arrow": b15.meta["artifacts"]["arrow"]["sha256"]}
    assert lock["router"]["temperature"] == 0.5 and lock["router"]["layers"] == ["l0.*"]
    text = (tmp_path / "comp.lock").read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    comp = load_composition(tmp_path / "comp.lock")
    assert [r.ref for r in comp.experts] == ["b@1.5", "a@1"]
    (tmp_path / "sub").mkdir()
    moved = lock_manifest(m, lock_dir=tmp_path / "sub")
    assert (moved["base"]["path"], moved["library"]) == ("../base.safetensors", "../lib")
    write_lock(tmp_path / "sub" / "comp.lock", moved)
    assert load_composition(tmp_path / "sub" / "comp.lock").base == str(
        tmp_path / "sub" / "../base.safetensors"
    )
    # the library changes under the lock: refused, naming the expert
    shutil.copyfile(tmp_path / "a1.patch", b15.patch_path)
    with pytest.raises(IntegrityError, match=r"expert b@1\.5 in the library differs from the lock"):
        load_composition(tmp_path / "comp.lock")


def test_lock_refuses_mismatched_base_and_bad_manifests(
    tmp_path: Path, base: Path, rng: np.random.Generator
) -> None:
    _library(tmp_path, base, rng)
    with open_path(base) as src:
        tensors = {n: src.read(n).copy() for n in src.names()}
    tensors[V] = tensors[V] + 1
    save_st(tmp_path / "other.safetensors", tensors)
    m = tmp_path / "comp.toml"
    m.write_text(
        MANIFEST.format(strategy="uniform", extra="").replace(
            "base.safetensors", "other.safetensors"
        )
    )
    with pytest.raises(
        IntegrityError, match=r"expert b@1\.5 was made for another base: 'l1\.v\.weight'"
    ):
        lock_manifest(m)
    m.write_text(MANIFEST.format(strategy="arow", extra=""))
    with pytest.raises(UserError, match="unknown router 'arow'"):
        read_manifest(m)
    m.write_text(MANIFEST.format(strategy="static", extra="weights = { a = 0.5 }"))
    with pytest.raises(
        FormatError, match=r"router.weights must name each expert once \(missing \['b'\]"
    ):
        lock_manifest(m)
    m.write_text(MANIFEST.format(strategy="uniform", extra="colour = 1"))
    with pytest.raises(FormatError, match="unknown router key 'colour'"):
        read_manifest(m)
    m.write_text(MANIFEST.format(strategy="uniform", extra="").replace('"a@*"', '"a@*", "a@1"'))
    with pytest.raises(FormatError, match="expert 'a' is listed twice"):
        read_manifest(m)
    m.write_text(MANIFEST.format(strategy="uniform", extra="").replace('"a@*"', '"a@>=3"'))
    with pytest.raises(UserError, match="no version of expert 'a' satisfies '>=3'"):
        lock_manifest(m)


def test_export_mixture_equals_weighted_sum(
    tmp_path: Path, base: Path, rng: np.random.Generator
) -> None:
    fs = _library(tmp_path, base, rng)
    m = tmp_path / "comp.toml"
    m.write_text(
        MANIFEST.format(strategy="static", extra="weights = { a = 0.25, b = -0.5 }").replace(
            '["l0.*"]', '["*"]'
        )
    )
    comp = load_composition(m)
    info = export_mixture(comp, tmp_path / "mix.patch")
    assert info["tensors"] == [QB, Q, V] and info["weights"] == {"a": 0.25, "b": -0.5}
    apply_patch(base, tmp_path / "mix.patch", tmp_path / "mixed.safetensors")
    deltas = {r.name: expert_deltas(r.patch_path) for r in comp.experts}
    with open_path(base) as src, open_path(tmp_path / "mixed.safetensors") as got:
        for name in (Q, V):
            want = src.read(name).astype(np.float64)
            for ex, w in (("a", 0.25), ("b", -0.5)):
                a, b = fs["a@1" if ex == "a" else "b@1.5"][name]
                want = want + w * (b.astype(np.float64) @ a.astype(np.float64))
            np.testing.assert_allclose(got.read(name), want, rtol=0, atol=2e-6)
        want_b = src.read(QB) + 0.25 * deltas["a"][QB].delta - 0.5 * deltas["b"][QB].delta
        np.testing.assert_allclose(got.read(QB), want_b, rtol=0, atol=2e-6)
    _meta, arrays = read_safetensors(tmp_path / "mix.patch")
    assert arrays[f"{Q}/lora_A"].shape == (4, 8)  # rank 2 + 2: concatenated, exact


def test_peft_adapter_directory_is_imported(
    tmp_path: Path, base: Path, rng: np.random.Generator
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q", "v"]}
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    f = {Q: random_factors(rng, 2, 8, 6), V: random_factors(rng, 2, 8, 6)}
    tensors = {}
    for name, (a, b) in f.items():
        module = name.removesuffix(".weight")
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
    save_st(adapter / "adapter_model.safetensors", tensors)
    lib = tmp_path / "lib"
    with pytest.raises(UserError, match="PEFT adapter directory: importing it needs --base"):
        add_expert(lib, adapter, "p", "1")
    rec = add_expert(lib, adapter, "p", "1", base=str(base), options=AddOptions(arrow=True))
    assert rec.meta["source"]["kind"] == "peft" and rec.meta["kind"] == "lowrank"
    deltas = expert_deltas(rec.patch_path)
    for name, (a, b) in f.items():
        d = deltas[name]
        assert d.a is not None and d.b is not None
        np.testing.assert_allclose(d.b @ d.a, 2.0 * (b @ a), rtol=1e-6, atol=1e-6)
    assert verify_library(lib, base=open_path(base)) == []
