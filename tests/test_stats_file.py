"""Statistics files (``ops.stats``): round trip, metadata, checks, and the executor's helpers."""

from __future__ import annotations

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import FormatError, IntegrityError, UserError
from potluck.merging import MERGE_METHODS, TensorStats
from potluck.ops.merge.statsfile import check_stats_files, load_stats, stats_for, write_stats
from potluck.ops.models.torchdata import read_jsonl, read_npz


def sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


@pytest.fixture
def gram_file(tmp_path: Path, rng: np.random.Generator):
    x = rng.normal(size=(10, 4)).astype(np.float32)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    grams = {"fc.weight": x.T @ x, "conv.weight": np.eye(3, dtype=np.float32) * 2}
    path = tmp_path / "a.stats"
    write_stats(
        path,
        "gram",
        grams,
        samples=10,
        tokens=10,
        model_sha256={"fc.weight": sha(w)},
        data_sha256="ab" * 32,
        input_axes={"fc.weight": 1, "conv.weight": 0},
        description={"tool": "test"},
    )
    return path, grams, w


def test_gram_round_trip_is_bit_exact(gram_file) -> None:
    path, grams, _ = gram_file
    f = load_stats(path)
    assert (f.kind, f.samples, f.tokens, f.data_sha256) == ("gram", 10, 10, "ab" * 32)
    assert f.names() == ["conv.weight", "fc.weight"]
    assert f.input_axes == {"conv.weight": 0, "fc.weight": 1}
    assert f.description == {"tool": "test"} and f.fisher_norm is None
    for name, g in grams.items():
        got = f.get(name)
        assert got is not None and got.dtype == np.float32
        assert got.tobytes() == g.tobytes()
    assert f.get("nope") is None
    ts = f.tensor_stats("conv.weight")
    assert ts is not None and (ts.kind, ts.input_axis) == ("gram", 0)


def test_file_is_a_plain_safetensors_with_sorted_metadata(gram_file) -> None:
    path, grams, _ = gram_file
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__")
    assert list(meta) == sorted(meta)
    assert meta["potluck_stats"] == "1" and meta["kind"] == "gram"
    assert json.loads(meta["tensor_sha256"]) == {k: sha(v) for k, v in grams.items()}
    model = json.loads(meta["model_sha256"])
    canon = json.dumps(model, sort_keys=True, separators=(",", ":"))
    assert meta["model_digest"] == hashlib.sha256(canon.encode()).hexdigest()
    assert {k: v["dtype"] for k, v in header.items()} == {k: "F32" for k in grams}


def test_fisher_norm_is_the_whole_model_norm(tmp_path: Path) -> None:
    tensors = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    write_stats(tmp_path / "f.stats", "fisher", tensors, samples=2, tokens=5)
    f = load_stats(tmp_path / "f.stats")
    assert f.fisher_norm == 5.0 and f.kind == "fisher"
    ts = f.tensor_stats("a")
    assert ts is not None and ts.model_norm == 5.0 and ts.kind == "fisher"


def test_corrupt_statistics_are_detected(gram_file) -> None:
    path, _, _ = gram_file
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40
    path.write_bytes(bytes(raw))
    f = load_stats(path)
    with pytest.raises(IntegrityError, match="do not match their recorded sha256"):
        f.get(f.names()[-1])
    path.write_bytes(bytes(raw[:-5]))
    with pytest.raises(FormatError, match="truncated"):
        load_stats(path)


def test_not_a_statistics_file(tmp_path: Path) -> None:
    from potluck.formats.safetensors import build_header

    plain = tmp_path / "model.safetensors"
    plain.write_bytes(build_header([("w", "F32", (1,))], {"format": "pt"}) + b"\0" * 4)
    with pytest.raises(FormatError, match="not a potluck statistics file"):
        load_stats(plain)
    (tmp_path / "junk").write_bytes(b"hello world")
    with pytest.raises(FormatError, match="not a statistics file"):
        load_stats(tmp_path / "junk")
    meta = {"potluck_stats": "9", "kind": "gram"}
    (tmp_path / "v9").write_bytes(build_header([("w", "F32", (1,))], meta) + b"\0" * 4)
    with pytest.raises(FormatError, match="version '9' is not supported"):
        load_stats(tmp_path / "v9")


@pytest.mark.parametrize(
    ("kind", "tensors", "match"),
    [
        ("hessian", {"a": np.ones(2)}, "unknown statistics kind 'hessian'"),
        ("fisher", {"a": -np.ones(2)}, "Fisher of 'a' has negative values"),
        ("gram", {"a": np.ones((2, 3))}, r"'a' is neither square nor a 1-D diagonal: \[2, 3\]"),
        ("gram", {"a": np.full((2, 2), np.nan)}, "contain NaN"),
    ],
)
def test_writer_refuses_bad_statistics(tmp_path: Path, kind, tensors, match) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(UserError, match=match):
        write_stats(out / "x", kind, tensors, samples=1, tokens=1)
    assert list(out.iterdir()) == []  # nothing half-written


def test_stats_for_and_the_model_hash_check(gram_file) -> None:
    path, grams, w = gram_file
    f = load_stats(path)
    assert stats_for([None, None], "fc.weight") is None
    entries = stats_for([f, None], "fc.weight", [w, w])
    assert entries is not None and entries[1] is None
    assert isinstance(entries[0], TensorStats) and entries[0].input_axis == 1
    np.testing.assert_array_equal(entries[0].array, grams["fc.weight"])
    with pytest.raises(UserError, match=r"computed for another version of tensor 'fc\.weight'"):
        stats_for([f, None], "fc.weight", [w + 1, w])
    assert stats_for([f], "conv.weight", [np.ones((3, 3))]) is not None  # no hash recorded


def test_check_stats_files_kind_and_presence(gram_file, tmp_path: Path) -> None:
    path, _, _ = gram_file
    g = load_stats(path)
    write_stats(tmp_path / "f.stats", "fisher", {"fc.weight": np.ones((3, 4))}, samples=1, tokens=1)
    fi = load_stats(tmp_path / "f.stats")
    check_stats_files([g, None], "gram", "regmean")
    with pytest.raises(UserError, match=r"model 1: .*f\.stats holds fisher statistics, but "):
        check_stats_files([g, fi], "gram", "regmean")
    with pytest.raises(UserError, match="'fisher' needs fisher statistics, but no model has"):
        check_stats_files([None, None], "fisher", "fisher")
    with pytest.raises(UserError, match="'linear' takes no statistics"):
        check_stats_files([g], None, "linear")


def test_file_statistics_drive_a_regmean_merge(gram_file, rng) -> None:
    path, _, w = gram_file
    f = load_stats(path)
    w2 = rng.normal(size=(3, 4)).astype(np.float32)
    out = MERGE_METHODS.get("regmean").merge(
        [w, w2], None, None, name="fc.weight", seed=0, stats=stats_for([f, f], "fc.weight"), alpha=1
    )
    # both models share the Gram: the least-squares solution is the plain average
    np.testing.assert_allclose(out, (w + w2) / 2, rtol=1e-5, atol=1e-6)


def test_torch_is_imported_only_when_statistics_are_computed() -> None:
    code = (
        "import sys, potluck.cli.stats_cmd, potluck.ops.merge.stats_torch, potluck.merging; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_read_jsonl(tmp_path: Path) -> None:
    good = tmp_path / "a.jsonl"
    good.write_text(
        '{"text": "a b", "label": 1}\n\n{"text": "c", "label": 0}\n{"text": "d", "label": 2}\n'
    )
    assert read_jsonl(good, None) == (["a b", "c", "d"], [1, 0, 2])
    assert read_jsonl(good, 2) == (["a b", "c"], [1, 0])
    plain = tmp_path / "b.jsonl"
    plain.write_text('{"text": "x"}\n{"text": "y"}\n')
    assert read_jsonl(plain, None) == (["x", "y"], None)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"text": "x", "label": 1}\n{"text": "y"}\n', r"b\.jsonl:2: some lines have a \"label\""),
        ('{"text": "x"}\n{"text": "y", "label": 1}\n', "some lines have a"),
        ('{"text": "x", "label": 1.5}\n', r'"label" must be an integer, got 1\.5'),
        ('{"text": "x", "label": true}\n', '"label" must be an integer'),
        ('{"txt": "x"}\n', r'b\.jsonl:1: no "text" string'),
        ("not json\n", r"b\.jsonl:1: not JSON"),
    ],
)
def test_read_jsonl_errors(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "b.jsonl").write_text(text)
    with pytest.raises(UserError, match=match):
        read_jsonl(tmp_path / "b.jsonl", None)


def test_read_npz(tmp_path: Path) -> None:
    ids = np.arange(12).reshape(3, 4)
    np.savez(tmp_path / "a.npz", input_ids=ids, labels=np.array([0, 1, 0]))
    got = read_npz(tmp_path / "a.npz", 2)
    np.testing.assert_array_equal(got["input_ids"], ids[:2])
    np.testing.assert_array_equal(got["attention_mask"], np.ones((2, 4)))
    np.testing.assert_array_equal(got["labels"], [0, 1])
    np.savez(tmp_path / "b.npz", input_ids=ids, extra=ids)
    with pytest.raises(UserError, match=r"unexpected arrays \['extra'\]"):
        read_npz(tmp_path / "b.npz", None)
    np.savez(tmp_path / "c.npz", tokens=ids)
    with pytest.raises(UserError, match="needs an integer 'input_ids' array"):
        read_npz(tmp_path / "c.npz", None)
    np.savez(tmp_path / "f.npz", input_ids=ids.astype(np.float32))
    with pytest.raises(UserError, match="needs an integer 'input_ids' array"):
        read_npz(tmp_path / "f.npz", None)
    np.savez(tmp_path / "d.npz", input_ids=ids, labels=np.zeros(5))
    with pytest.raises(UserError, match=r"labels must be \[N\] or \[N, T\]"):
        read_npz(tmp_path / "d.npz", None)
