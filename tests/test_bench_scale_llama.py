"""bench.scale's llama case (issue 19, item 4): the generated checkpoint, its history, the disk
check, and a bit-exact checkout of the history through potluck at a few MB."""

from __future__ import annotations

import argparse
import filecmp
import json
import re
from pathlib import Path

import numpy as np
import pytest

from bench.common.measure import CommandError
from bench.scale import llama
from tests.conftest import Run

TINY_GB, TINY_SHARD_GB = 0.002, 0.0008  # ~2 MB in 3 shards


def read_checkpoint(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of an HF sharded checkpoint as raw bf16 bits, via the index (own reader)."""
    index = json.loads((folder / llama.INDEX).read_text())
    out: dict[str, np.ndarray] = {}
    for file in sorted(set(index["weight_map"].values())):
        raw = (folder / file).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + n])
        assert meta.pop("__metadata__") == {"format": "pt"}
        for name, info in meta.items():
            assert info["dtype"] == "BF16"
            assert index["weight_map"][name] == file
            start, end = (8 + n + o for o in info["data_offsets"])
            out[name] = np.frombuffer(raw[start:end], np.uint16).reshape(info["shape"])
    assert sorted(out) == sorted(index["weight_map"])  # every tensor once, in its named file
    return out


def as_f64(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, np.ndarray]]:
    layout = llama.make_layout(TINY_GB, TINY_SHARD_GB)
    root = tmp_path_factory.mktemp("llama")
    out = []
    for v in range(len(llama.VERSIONS)):
        llama.write_version(root / f"v{v}", layout, v)
        out.append(read_checkpoint(root / f"v{v}"))
    return out


def test_layout_is_an_hf_sharded_checkpoint_whose_shapes_follow_config_json(
    tmp_path: Path,
) -> None:
    layout = llama.make_layout(TINY_GB, TINY_SHARD_GB)
    digests = llama.write_version(tmp_path, layout, 0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    want = {"model.embed_tokens.weight": [vocab, h], "model.norm.weight": [h]}
    want["lm_head.weight"] = [vocab, h]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for proj, shape in (("q", [h, h]), ("k", [kv, h]), ("v", [kv, h]), ("o", [h, h])):
            want[f"{p}self_attn.{proj}_proj.weight"] = shape
        want[p + "mlp.gate_proj.weight"] = want[p + "mlp.up_proj.weight"] = [inter, h]
        want[p + "mlp.down_proj.weight"] = [h, inter]
        want[p + "input_layernorm.weight"] = want[p + "post_attention_layernorm.weight"] = [h]
    tensors = read_checkpoint(tmp_path)
    assert {k: list(v.shape) for k, v in tensors.items()} == want
    assert cfg["torch_dtype"] == "bfloat16" and cfg["model_type"] == "llama"
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    for f in files:  # every shard but a lone over-size tensor stays under the limit
        names = [k for k, v in json.loads((tmp_path / llama.INDEX).read_text())[
            "weight_map"].items() if v == f]  # fmt: skip
        if len(names) > 1:
            assert sum(tensors[k].nbytes for k in names) <= TINY_SHARD_GB * 1e9
    index = json.loads((tmp_path / llama.INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    assert digests == {f: llama.file_sha256(tmp_path / f) for f in files}
    again = tmp_path / "again"
    assert llama.write_version(again, layout, 0) == digests  # deterministic


def test_values_are_in_a_sane_bf16_range(versions: list[dict[str, np.ndarray]]) -> None:
    for name, bits in versions[0].items():
        mag = np.abs(as_f64(bits))
        lo, hi = (1.0, 1.5) if bits.ndim == 1 else (2.0**-7, 2.0**-3)
        assert mag.min() >= lo and mag.max() < hi, name


def test_dense_step_moves_only_the_two_low_mantissa_bits_of_most_values(
    versions: list[dict[str, np.ndarray]],
) -> None:
    v0, v1 = versions[0], versions[1]
    flips = np.concatenate([(v0[k] ^ v1[k]).ravel() for k in v0])
    assert not np.any(flips & ~np.uint16(3))
    assert 0.73 < np.count_nonzero(flips) / flips.size < 0.77  # 3 of 4 bit pairs are non-zero
    assert all(np.any(v0[k] != v1[k]) for k in v0)


def test_lora_step_adds_a_rank_8_product_to_the_attention_matrices_only(
    versions: list[dict[str, np.ndarray]],
) -> None:
    v1, v2 = versions[1], versions[2]
    names = list(v1)
    attention = [k for k in names if k.endswith(llama.ATTENTION)]
    assert [k for k in names if np.any(v1[k] != v2[k])] == attention
    for k in attention:
        b, a = llama._lora([llama.SEED, 2, names.index(k)], *v1[k].shape)
        exact = as_f64(v1[k]) + b.astype(np.float64) @ a.astype(np.float64)
        got = as_f64(v2[k])
        ulp = 2.0 ** (np.floor(np.log2(np.abs(got))) - 7)
        assert np.all(np.abs(got - exact) <= 0.5 * ulp * (1 + 1e-3)), k  # rounded to nearest
        assert np.linalg.matrix_rank(exact - as_f64(v1[k]), tol=1e-9) == llama.LORA_RANK


def test_sparse_step_changes_about_one_percent_of_three_tensors(
    versions: list[dict[str, np.ndarray]],
) -> None:
    v2, v3 = versions[2], versions[3]
    layers = len([k for k in v2 if k.endswith("input_layernorm.weight")])
    mid = f"model.layers.{layers // 2}."
    want = [mid + "self_attn.q_proj.weight", mid + "self_attn.o_proj.weight"]
    want.append(mid + "mlp.down_proj.weight")
    assert sorted(k for k in v2 if np.any(v2[k] != v3[k])) == sorted(want)
    for k in want:
        assert 0.008 < np.count_nonzero(v2[k] != v3[k]) / v2[k].size <= 0.01


def test_the_run_refuses_when_the_disk_is_short_and_names_needed_and_free(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    layout = llama.make_layout(1.0)  # one shard: every version stores the whole file
    size = layout.total_bytes
    assert len(layout.shards) == 1
    assert llama.disk_needed(layout) == size + 2 * 4 * layout.file_bytes(layout.shards[0][0]) + (
        llama.GB // 2
    )
    monkeypatch.setattr(llama, "free_bytes", lambda where: 20 * llama.GB)
    args = argparse.Namespace(
        llama_gb=1.0, llama_shard_gb=5.0, llama_reserve_gb=15.0, workdir=tmp_path
    )
    assert llama.run(args) == 2
    err = capsys.readouterr().err
    need = llama.disk_needed(layout) / llama.GB
    assert err.startswith(
        f"llama: a {size / 1e9:.1f} GB model needs {need:.1f} GB of disk; 20.0 GB free in "
        f"{tmp_path}, 15 GB kept in reserve. Largest size that fits: --llama-gb "
    )
    fits = float(re.findall(r"--llama-gb ([0-9.]+)", err)[0])
    room = 5 * llama.GB
    assert llama.disk_needed(llama.make_layout(fits)) <= room
    assert llama.disk_needed(llama.make_layout(fits + 0.5)) > room


@pytest.mark.parametrize(
    "last", [1, pytest.param(3, marks=pytest.mark.heavy)], ids=["dense", "full-history"]
)
def test_history_checks_out_bit_exact_through_potluck(
    repo: Path, git: Run, tmp_path: Path, last: int
) -> None:
    """v0..v``last`` committed; v0 and v``last`` checked out equal freshly generated files
    (the full history, ~15 s under load, includes the merged LoRA and the sparse step)."""
    layout = llama.make_layout(TINY_GB, TINY_SHARD_GB)
    model = repo / llama.MODEL_DIR
    for v in range(last + 1):
        llama.write_version(model, layout, v)
        git("git", "add", "-A", ".")
        git("git", "commit", "-q", "-m", llama.VERSIONS[v])
    git("git", "checkout", "-q", f"HEAD~{last}")
    for v in (0, last):
        ref = tmp_path / f"ref{v}"
        llama.write_version(ref, layout, v)
        files = sorted(p.name for p in ref.iterdir())
        match, mismatch, errors = filecmp.cmpfiles(ref, model, files, shallow=False)
        assert (mismatch, errors) == ([], []) and len(match) == len(layout.shards) + 2
        git("git", "checkout", "-q", "main")


def test_a_step_that_would_leave_under_the_floor_is_not_started(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(llama, "free_bytes", lambda where: 12 * llama.GB)
    llama.ensure_room(7 * llama.GB, "the clone", tmp_path)  # leaves exactly the 5 GB floor
    with pytest.raises(CommandError) as err:
        llama.ensure_room(7 * llama.GB + 1, "the clone", tmp_path)
    assert str(err.value) == (
        "not started: the clone needs 7.0 GB of disk, 12.0 GB free and 5 GB must stay free"
    )
