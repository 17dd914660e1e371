"""``potluck peft apply|import|export`` against fixtures made by the real peft 0.21.2.

The fixtures (tests/fixtures/peft, built by tests/fixtures/make_peft_fixtures.py in a separate
venv with torch/peft/transformers) hold tiny Llama and GPT-2 bases, adapters with random
non-zero weights and the tensors peft's ``merge_and_unload()`` changed. Nothing here needs peft.
``python tests/test_peft.py`` rewrites the export fixtures (then run the generator with
``--check-export`` to have peft load them).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import potluck.cli.patch_cmd
import potluck.cli.peft_cmd  # noqa: F401  (registers `peft`)
from potluck.cli.main import cli
from potluck.codecs import CODECS
from potluck.errors import UserError
from potluck.formats import scan_file
from potluck.ops.models.sources import open_path
from potluck.ops.patch.fileformat import read_patch
from potluck.ops.peft.adapter import read_adapter
from potluck.ops.peft.apply import apply_adapter
from potluck.ops.peft.arithmetic import fma_matmul
from potluck.ops.peft.config import (
    is_feedforward,
    parse_config,
    pattern_value,
    read_config,
    targets,
)
from potluck.ops.peft.export import export_patch
from potluck.ops.peft.importer import import_adapter

FIX = Path(__file__).parent / "fixtures" / "peft"
CASES = sorted(p.name for p in FIX.iterdir() if (p / "expected.json").is_file())
EXPORTS = {"patterns": "llama", "gpt2_embed": "gpt2", "lora_bias": "llama"}
U = 2.0**-24  # float32 unit roundoff


def info(case: str) -> dict:
    return json.loads((FIX / case / "expected.json").read_text())


def tensors(path: Path) -> dict[str, np.ndarray]:
    with open_path(path) as src:
        return {n: np.array(src.read(n)) for n in src.names()}


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def expected_model(case: str) -> dict[str, np.ndarray]:
    """merge_and_unload()'s full state: the base with peft's changed tensors swapped in."""
    out = tensors(FIX / "bases" / info(case)["base"])
    out.update(tensors(FIX / case / "expected.safetensors"))
    return out


def copy_adapter(case: str, dest: Path) -> Path:
    shutil.copytree(FIX / case / "adapter", dest)
    return dest


def edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


# ----------------------------------------------------------------------------------- apply


def test_fixtures_are_small_and_cover_every_case() -> None:
    total = sum(p.stat().st_size for p in FIX.rglob("*") if p.is_file())
    assert total < 2_000_000
    assert len(CASES) >= 14


@pytest.mark.parametrize("case", CASES)
def test_apply_is_bit_identical_to_merge_and_unload(case: str, tmp_path: Path) -> None:
    base_dir = FIX / "bases" / info(case)["base"]
    report = apply_adapter(base_dir, FIX / case / "adapter", tmp_path / "out")
    got, want = tensors(tmp_path / "out"), expected_model(case)
    assert sorted(got) == info(case)["keys"]
    bad = [n for n in want if not same_bits(got[n], want[n])]
    assert bad == []
    assert report.changed == info(case)["changed"]


@pytest.mark.parametrize("case", ["lora_sharded", "gpt2_lora"])
def test_apply_keeps_the_base_layout_and_files(case: str, tmp_path: Path) -> None:
    base_dir = FIX / "bases" / info(case)["base"]
    apply_adapter(base_dir, FIX / case / "adapter", tmp_path / "out", base_ref="org/tiny")
    out = tmp_path / "out"
    base_files = sorted(p.name for p in base_dir.iterdir())
    want_files = sorted([*base_files, "README.md", "lineage.json"])
    assert sorted(p.name for p in out.iterdir()) == want_files
    for p in base_dir.iterdir():
        if p.suffix == ".safetensors":
            want, got = scan_file(p), scan_file(out / p.name)
            assert [s.name for s in got.tensor_segments()] == [
                s.name for s in want.tensor_segments()
            ]
            assert got.metadata == want.metadata == {"format": "pt"}
        else:
            assert (out / p.name).read_bytes() == p.read_bytes()
    card = (out / "README.md").read_text()
    assert card.startswith('---\nbase_model: "org/tiny"\nbase_model_relation: finetune\n')


def _apply_error(tmp_path: Path, adapter: Path, base: str = "llama") -> UserError:
    out = tmp_path / "out"
    with pytest.raises(UserError) as exc:
        apply_adapter(FIX / "bases" / base, adapter, out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return exc.value


def test_unknown_adapter_key_is_an_error_naming_it(tmp_path: Path) -> None:
    adapter = copy_adapter("lora", tmp_path / "a")
    st = adapter / "adapter_model.safetensors"
    raw = st.read_bytes().replace(b"layers.1.self_attn.v_proj", b"layers.1.self_attn.x_proj")
    st.write_bytes(raw)
    edit_config(adapter, target_modules=["q_proj", "v_proj", "x_proj"])
    err = _apply_error(tmp_path, adapter)
    assert "base_model.model.model.layers.1.self_attn.x_proj" in err.message
    assert "no parameter 'model.layers.1.self_attn.x_proj.weight'" in err.message


def test_shape_mismatch_and_untargeted_module_are_errors(tmp_path: Path) -> None:
    err = _apply_error(tmp_path, FIX / "lora" / "adapter", base="gpt2")
    assert "no parameter 'model.layers.0.self_attn.q_proj.weight'" in err.message
    adapter = copy_adapter("gpt2_lora", tmp_path / "a")
    edit_config(adapter, fan_in_fan_out=False)
    err = _apply_error(tmp_path, adapter, base="gpt2")
    assert "fan_in_fan_out" in err.message and "transformer.h.0.attn.c_attn" in err.message
    edit_config(adapter, fan_in_fan_out=True, target_modules=["c_attn", "c_fc"])
    err = _apply_error(tmp_path, adapter, base="gpt2")
    assert "attn.c_proj" in err.message and "not selected by target_modules" in err.message


@pytest.mark.parametrize(
    ("change", "option"),
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"use_qalora": True}, "use_qalora"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights"),
        ({"layer_replication": [[0, 1]]}, "layer_replication"),
        ({"brand_new_option": 3}, "brand_new_option"),
        ({"r": 8}, None),
    ],
)
def test_unsupported_options_are_errors_naming_them(
    tmp_path: Path, change: dict, option: str | None
) -> None:
    adapter = copy_adapter("lora", tmp_path / "a")
    edit_config(adapter, **change)
    err = _apply_error(tmp_path, adapter)
    if option is None:  # r disagrees with the tensors
        assert "rank 4 but adapter_config.json gives 8" in err.message
    else:
        assert err.data["option"] == option and option in err.message


def test_out_dir_must_be_new_or_empty(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty directory"):
        apply_adapter(FIX / "bases" / "llama", FIX / "lora" / "adapter", out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import potluck.ops.peft.apply as peft_ops

    real, calls = peft_ops.merged, []

    def failing(plan: object, base: object, name: str) -> np.ndarray:
        calls.append(name)
        if len(calls) == 20:  # second shard of the sharded base
            raise UserError("disk full (simulated)")
        return real(plan, base, name)  # type: ignore[arg-type]

    monkeypatch.setattr(peft_ops, "merged", failing)
    base, work = FIX / "bases" / "llama_sharded", tmp_path / "work"
    work.mkdir()
    with pytest.raises(UserError, match="simulated"):
        apply_adapter(base, FIX / "lora_sharded" / "adapter", work / "out")
    assert len(calls) == 20 and list(work.iterdir()) == []


def test_pattern_and_target_semantics_follow_peft() -> None:
    patterns = {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6, "v_proj": 3}
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 9) == 2
    assert pattern_value(patterns, "model.layers.1.self_attn.v_proj", 9) == 6  # first match
    assert pattern_value(patterns, "model.layers.11.self_attn.v_proj", 9) == 3
    assert pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 9) == 9  # not a suffix
    cfg = parse_config(
        {"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [1]}
    )
    assert targets(cfg, "model.layers.1.self_attn.q_proj")
    assert not targets(cfg, "model.layers.0.self_attn.q_proj")
    ia3 = parse_config(
        {
            "peft_type": "IA3",
            "target_modules": ["down_proj", "up_proj"],
            "feedforward_modules": ["n_proj"],
        }
    )
    assert is_feedforward(ia3, "mlp.down_proj") and not is_feedforward(ia3, "mlp.up_proj")
    assert targets(ia3, "mlp.down_proj") and not targets(ia3, "mlp.xdown_proj")
    regex = parse_config({"peft_type": "LORA", "target_modules": r".*\.q_proj"})
    assert targets(regex, "a.q_proj") and not targets(regex, "a.q_proj.x")


def _fma_reference(x: float, y: float, acc: np.float32) -> np.float32:
    """Correctly rounded float32 of x·y + acc, from exact rational arithmetic."""
    exact = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(acc))
    near = np.float32(float(exact))
    cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    errs = [abs(Fraction(float(c)) - exact) for c in cands]
    best = min(errs)
    ties = [c for c, e in zip(cands, errs, strict=True) if e == best]
    return min(ties, key=lambda c: int(np.float32(c).view(np.uint32)) & 1)


def test_fma_matmul_is_a_correctly_rounded_fma_chain(rng: np.random.Generator) -> None:
    b = (rng.standard_normal((7, 6)) * np.exp2(rng.integers(-3, 4, (7, 6)))).astype(np.float32)
    a = rng.standard_normal((6, 9)).astype(np.float32)
    got = fma_matmul(b, a)
    for i in range(7):
        for j in range(9):
            acc = np.float32(0)
            for k in range(6):
                acc = _fma_reference(b[i, k], a[k, j], acc)
            assert got[i, j] == acc


def test_cli_apply_json(tmp_path: Path) -> None:
    base, adapter = FIX / "bases" / "gpt2", FIX / "gpt2_ia3" / "adapter"
    res = CliRunner().invoke(
        cli, ["peft", "apply", str(base), str(adapter), str(tmp_path / "o"), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["changed"] == info("gpt2_ia3")["changed"]
    res = CliRunner().invoke(
        cli, ["peft", "apply", str(base), str(FIX / "lora" / "adapter"), str(tmp_path / "p")]
    )
    assert res.exit_code == 2 and "potluck: error:" in res.output and not (tmp_path / "p").exists()


# ---------------------------------------------------------------------------------- import


def _bound(case: str, name: str, base: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Elementwise bound on |patch result − peft result| (docs/peft.md, "Exactness").

    LoRA, u = 2⁻²⁴: |Δ| ≤ 2u·(|W| + |W'|) + (2r + 3)·u·|s|·(|B|·|A|) — both sides round a
    rank-r product (in different orders), the scaling and the final add. (IA)³: 4u·(|W| + |W'|).
    bf16/fp16 results: one unit in the last place of the stored dtype.
    """
    mag = np.abs(want.astype(np.float64)) + np.abs(base.astype(np.float64))
    if want.dtype != np.float32:
        return mag * 2.0 ** -float(ml_dtypes.finfo(want.dtype).nmant)
    adapter = read_adapter(FIX / case / "adapter")[1]
    module, key = name.rpartition(".")[0], f"base_model.model.{name.rpartition('.')[0]}"
    a = adapter.get(f"{key}.lora_A.weight", adapter.get(f"{key}.lora_embedding_A"))
    b = adapter.get(f"{key}.lora_B.weight", adapter.get(f"{key}.lora_embedding_B"))
    if a is None or b is None or not name.endswith(".weight"):
        return 4 * U * mag
    s = abs(read_config(FIX / case / "adapter").scaling(module))
    prod = np.abs(b.astype(np.float64)) @ np.abs(a.astype(np.float64))
    prod = prod if prod.shape == want.shape else prod.T
    return 2 * U * mag + (2 * a.shape[0] + 3) * U * s * prod


@pytest.mark.parametrize("case", CASES)
def test_import_then_decode_matches_peft(case: str, tmp_path: Path) -> None:
    base_dir = FIX / "bases" / info(case)["base"]
    report = import_adapter(FIX / case / "adapter", base_dir, tmp_path / "p.patch")
    patch = read_patch(tmp_path / "p.patch")
    base, want = tensors(base_dir), expected_model(case)
    assert sorted(patch.payloads) == info(case)["changed"]
    for name, payload in patch.payloads.items():
        assert patch.base[name] == hashlib.sha256(base[name].tobytes()).hexdigest()
        got = CODECS.get(payload.codec).decode(payload, base[name])
        if CODECS.get(payload.codec).exact:
            assert same_bits(got, want[name]), name
            continue
        diff = np.abs(got.astype(np.float64) - want[name].astype(np.float64))
        assert np.all(diff <= _bound(case, name, base[name], want[name])), name
        if payload.codec == "lowrank" and payload.meta["mode"] == "factors":
            r = payload.meta["kept_rank"]
            assert payload.arrays["lora_A"].shape[0] == r < min(want[name].shape)
    assert report.codecs == {n: p.codec for n, p in patch.payloads.items()}


@pytest.mark.parametrize(
    ("case", "base_path"),
    [("gpt2_lora", "gpt2/model.safetensors"), ("lora_sharded", "llama_sharded"), ("ia3", "llama")],
)
def test_imported_patch_applies_with_potluck_patch_apply(
    case: str, base_path: str, tmp_path: Path
) -> None:
    base, patch, out = FIX / "bases" / base_path, tmp_path / "p.patch", tmp_path / "merged"
    adapter = FIX / case / "adapter"
    res = CliRunner().invoke(
        cli, ["peft", "import", str(adapter), "--base", str(base), "-o", str(patch), "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["peft_type"] == read_config(adapter).peft_type
    res = CliRunner().invoke(cli, ["patch", "apply", str(base), str(patch), "-o", str(out)])
    assert res.exit_code == 0, res.output
    got, want, base_t = tensors(out), expected_model(case), tensors(base)
    assert sorted(got) == info(case)["keys"]
    for name in want:
        diff = np.abs(got[name].astype(np.float64) - want[name].astype(np.float64))
        assert np.all(diff <= _bound(case, name, base_t[name], want[name])), name


# ---------------------------------------------------------------------------------- export


def make_export_fixtures() -> None:
    """Rewrite tests/fixtures/peft/export/<case>/ (import the case, export it)."""
    import tempfile

    for case, base in EXPORTS.items():
        dest = FIX / "export" / case
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        with tempfile.TemporaryDirectory() as tmp:
            patch = Path(tmp) / "p.patch"
            import_adapter(FIX / case / "adapter", FIX / "bases" / base, patch)
            export_patch(patch, dest / "adapter", base_model=f"bases/{base}")
        (dest / "export.json").write_text(json.dumps({"base": base, "case": case}) + "\n")


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_export_writes_the_committed_adapter_bytes(case: str, tmp_path: Path) -> None:
    base = FIX / "bases" / EXPORTS[case]
    import_adapter(FIX / case / "adapter", base, tmp_path / "p.patch")
    report = export_patch(tmp_path / "p.patch", tmp_path / "a", base_model=f"bases/{EXPORTS[case]}")
    committed = FIX / "export" / case / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (tmp_path / "a" / name).read_bytes() == (committed / name).read_bytes(), name
    cfg = json.loads((committed / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == report.r and cfg["lora_alpha"] == report.r
    for module, rank in report.ranks.items():  # every module's scaling is exactly 1
        assert pattern_value(cfg["rank_pattern"], module, cfg["r"]) == rank
        assert pattern_value(cfg["alpha_pattern"], module, cfg["lora_alpha"]) == rank
    layout = scan_file(committed / "adapter_model.safetensors")
    assert layout.metadata == {"format": "pt"}
    names = sorted(s.name for s in layout.tensor_segments())
    suffixes = {
        "lora": (".lora_A.weight", ".lora_B.weight"),
        "lora_t": (".lora_A.weight", ".lora_B.weight"),
        "embedding_t": (".lora_embedding_A", ".lora_embedding_B"),
    }
    kinds = read_patch(tmp_path / "p.patch").description["peft_kinds"]
    want = [
        f"base_model.model.{m}{suffix}"
        for m in report.modules
        for suffix in suffixes[kinds[f"{m}.weight"]]
        + ((".lora_B.bias",) if report.lora_bias else ())
    ]
    assert names == sorted(want)


@pytest.mark.parametrize("case", sorted(EXPORTS))
def test_peft_loads_the_exported_adapter_and_reproduces_the_patch(
    case: str, tmp_path: Path
) -> None:
    """peft_merged.safetensors: PeftModel.from_pretrained(base, exported).merge_and_unload()."""
    peft_merged = tensors(FIX / "export" / case / "peft_merged.safetensors")
    want = expected_model(case)
    base = tensors(FIX / "bases" / EXPORTS[case])
    assert sorted(peft_merged) == info(case)["changed"]
    for name, got in peft_merged.items():
        diff = np.abs(got.astype(np.float64) - want[name].astype(np.float64))
        assert np.all(diff <= _bound(case, name, base[name], want[name])), name
    # and potluck's own apply of the exported adapter equals what peft made of it, bit for bit
    apply_adapter(FIX / "bases" / EXPORTS[case], FIX / "export" / case / "adapter", tmp_path / "o")
    ours = tensors(tmp_path / "o")
    assert all(same_bits(ours[n], peft_merged[n]) for n in peft_merged)


def test_export_refuses_what_lora_cannot_express(tmp_path: Path) -> None:
    import_adapter(FIX / "dora" / "adapter", FIX / "bases" / "llama", tmp_path / "d.patch")
    with pytest.raises(UserError, match=r"model\.layers\.0\.mlp\.down_proj\.weight.*dora"):
        export_patch(tmp_path / "d.patch", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(
        cli, ["peft", "export", str(tmp_path / "d.patch"), str(tmp_path / "o")]
    )
    assert res.exit_code == 2 and "cannot export" in res.output


if __name__ == "__main__":
    if sys.argv[1:] == ["--make-export"]:
        make_export_fixtures()
