"""Checkpoint formats: layouts tile files exactly and tensors match the reference loaders."""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import FormatError
from potluck.formats import FORMATS, detect, scan_file
from potluck.formats.base import Layout, TensorSegment, View
from potluck.formats.npz import NpzFormat
from potluck.formats.safetensors import SafetensorsFormat, build_header, canonical_order
from potluck.formats.torch_zip import TorchZipFormat
from potluck.tensors.dtypes import dtype_names, to_numpy

torch.set_num_threads(1)

# dtypes the safetensors library can write (it has no complex128)
ST_DTYPES = [d for d in dtype_names() if d != "C128"]


# ----------------------------------------------------------------------------- helpers


def random_array(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Random bits of ``dtype`` (bools kept 0/1)."""
    dt = to_numpy(dtype)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    if dtype == "BOOL":
        raw &= 1
    return raw.view(dt).reshape(shape)


def check_tiles(path: Path, layout: Layout) -> bytes:
    """Concatenated segment bytes reproduce the file; returns the file bytes."""
    data = path.read_bytes()
    assert layout.size == len(data)
    pieces = [data[s.offset : s.offset + s.length] for s in layout.segments]
    assert b"".join(pieces) == data
    pos = 0
    for seg in layout.segments:
        assert seg.offset == pos
        pos += seg.length
    assert pos == len(data)
    return data


def segment_array(data: bytes, seg: TensorSegment) -> np.ndarray:
    """The array a tensor segment describes."""
    buf = data[seg.offset : seg.offset + seg.length]
    return np.frombuffer(buf, dtype=to_numpy(seg.dtype)).reshape(seg.shape)


def view_array(data: bytes, layout: Layout, view: View) -> np.ndarray:
    """Rebuild a view from its storage segment with ``as_strided``."""
    (seg,) = [s for s in layout.tensor_segments() if s.name == view.storage]
    dt = to_numpy(view.dtype)
    base = np.frombuffer(data[seg.offset : seg.offset + seg.length], dtype=np.uint8).view(dt)
    strides = tuple(s * dt.itemsize for s in view.stride)
    return np.lib.stride_tricks.as_strided(
        base[view.offset :], shape=view.shape, strides=strides, writeable=False
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and same bytes (bit-for-bit, NaNs included)."""
    return a.shape == b.shape and a.tobytes() == b.tobytes()


def torch_bytes(t: torch.Tensor) -> bytes:
    """A tensor's elements as little-endian C-order bytes."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


class ReadTracker(io.BytesIO):
    """A BytesIO that remembers the furthest byte read."""

    furthest = 0

    def read(self, n: int | None = -1, /) -> bytes:
        out = super().read(n)
        self.furthest = max(self.furthest, self.tell())
        return out


# ----------------------------------------------------------------------------- safetensors


def test_registry_and_detection(tmp_path: Path) -> None:
    assert FORMATS.names() == ["npz", "pytorch", "safetensors"]
    assert [name for name, _ in FORMATS.items()] == ["safetensors", "pytorch", "npz"]
    st_path = tmp_path / "a.safetensors"
    safetensors.numpy.save_file({"x": np.zeros(2, np.float32)}, st_path)
    pt_path = tmp_path / "a.pt"
    torch.save({"x": torch.zeros(2)}, pt_path)
    npz_path = tmp_path / "a.npz"
    np.savez(npz_path, x=np.zeros(2))
    for path, cls in [
        (st_path, SafetensorsFormat),
        (pt_path, TorchZipFormat),
        (npz_path, NpzFormat),
    ]:
        data = path.read_bytes()
        assert isinstance(detect(data[:4096], len(data)), cls)
    assert detect(b"", 0) is None
    assert detect(b"PK\x03\x04", 4) is None


def test_safetensors_every_dtype(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {f"t.{d.lower()}": random_array(rng, d, (3, 2)) for d in ST_DTYPES}
    tensors["empty"] = np.zeros((0, 4), np.float32)
    tensors["scalar"] = np.array(2.5, np.float64)
    tensors["ü/ñ"] = random_array(rng, "BF16", (5,))
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})

    layout = scan_file(path)
    data = check_tiles(path, layout)
    assert layout.format == "safetensors"
    assert layout.metadata == {"format": "pt"}
    segs = {s.name: s for s in layout.tensor_segments()}
    assert set(segs) == set(tensors)
    assert segs["empty"].length == 0 and segs["empty"].shape == (0, 4)
    assert segs["scalar"].shape == ()
    reference = dict(safetensors.deserialize(data))  # type: ignore[no-untyped-call]
    ref_torch = safetensors.torch.load_file(path)
    for name, arr in tensors.items():
        seg = segs[name]
        assert seg.dtype == reference[name]["dtype"]
        assert list(seg.shape) == reference[name]["shape"]
        got = segment_array(data, seg)
        assert same_bits(got, arr)
        assert got.tobytes() == bytes(reference[name]["data"]) == torch_bytes(ref_torch[name])
    # the library's numpy loader knows only the standard numpy dtypes: check those separately
    std_dtypes = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32", "F64"}
    std = {n: a for n, a in tensors.items() if dtype_of(a) in std_dtypes | {"C64"}}
    safetensors.numpy.save_file(std, tmp_path / "std.safetensors")
    std_layout = scan_file(tmp_path / "std.safetensors")
    std_data = check_tiles(tmp_path / "std.safetensors", std_layout)
    numeric = safetensors.numpy.load_file(tmp_path / "std.safetensors")
    assert len(numeric) == len(std) > 10
    for seg in std_layout.tensor_segments():
        assert same_bits(segment_array(std_data, seg), numeric[seg.name])


def test_safetensors_scan_reads_only_the_header() -> None:
    blob = safetensors.numpy.save({"a": np.ones(1000, np.float32), "b": np.ones(10, np.int8)})
    f = ReadTracker(blob)
    layout = SafetensorsFormat().scan(f, len(blob))
    assert f.furthest <= min(s.offset for s in layout.tensor_segments())


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}, {"note": 'ünï "q" \\ \n\x01'}])
def test_build_header_matches_library(metadata: dict[str, str] | None) -> None:
    rng = np.random.default_rng(1)
    shapes = {"b": (3,), "a": (2, 2), "z": (0,), "s": ()}
    tensors = {
        f"{n}_{d}": random_array(rng, d, shp)
        for d in ("F32", "BF16", "I8", "F64", "BOOL", "U16", "F8_E4M3", "C64")
        for n, shp in shapes.items()
    }
    expected = safetensors.numpy.save(tensors, metadata=metadata)
    triples = canonical_order((n, dtype_of(a), a.shape) for n, a in tensors.items())
    built = build_header(triples, metadata) + b"".join(tensors[n].tobytes() for n, _, _ in triples)
    assert built == expected
    assert len(build_header(triples, metadata)) % 8 == 0


def dtype_of(arr: np.ndarray) -> str:
    for name in dtype_names():
        if to_numpy(name) == arr.dtype:
            return name
    raise AssertionError(arr.dtype)


_NAME = st.text(
    alphabet=st.sampled_from([*"abcxyz019._-/", "é", "字"]), min_size=1, max_size=12
).filter(lambda s: s != "__metadata__")
_SHAPE = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(
    specs=st.dictionaries(_NAME, st.tuples(st.sampled_from(ST_DTYPES), _SHAPE), max_size=6),
    metadata=st.one_of(st.none(), st.dictionaries(_NAME, st.text(max_size=8), max_size=1)),
    seed=st.integers(0, 2**32 - 1),
)
def test_safetensors_round_trip(
    specs: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    tensors = {name: random_array(rng, d, shape) for name, (d, shape) in specs.items()}
    blob = safetensors.numpy.save(tensors, metadata=metadata)
    if not tensors and metadata == {}:
        # safetensors 0.8 writes invalid JSON here (`{},"__metadata__":{}}`) and cannot read it
        # back either; potluck refuses it just like the library does.
        with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
            SafetensorsFormat().scan(io.BytesIO(blob), len(blob))
        return
    layout = SafetensorsFormat().scan(io.BytesIO(blob), len(blob))
    assert b"".join(blob[s.offset : s.offset + s.length] for s in layout.segments) == blob
    assert layout.metadata == (metadata or {})
    segs = {s.name: s for s in layout.tensor_segments()}
    assert set(segs) == set(tensors)
    for name, arr in tensors.items():
        assert segs[name].dtype == specs[name][0]
        assert same_bits(segment_array(blob, segs[name]), arr)
    triples = canonical_order((n, d, shape) for n, (d, shape) in specs.items())
    assert [s.name for s in layout.tensor_segments()] == [n for n, _, _ in triples]
    data = b"".join(tensors[n].tobytes() for n, _, _ in triples)
    assert build_header(triples, metadata) + data == blob


def make_safetensors(header: dict[str, Any], data: bytes, pad: bool = True) -> bytes:
    raw = json.dumps(header).encode()
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def scan_bytes(tmp_path: Path, blob: bytes, name: str = "f.bin") -> Layout:
    path = tmp_path / name
    path.write_bytes(blob)
    return scan_file(path)


def test_safetensors_header_length_past_end(tmp_path: Path) -> None:
    blob = safetensors.numpy.save({"a": np.zeros(4, np.float32)})
    blob = struct.pack("<Q", len(blob)) + blob[8:]
    with pytest.raises(FormatError, match=r"header length \d+ runs past the end"):
        SafetensorsFormat().scan(io.BytesIO(blob), len(blob))


def test_safetensors_truncated_data(tmp_path: Path) -> None:
    blob = safetensors.numpy.save({"a": np.zeros(4, np.float32), "b": np.ones(3, np.int64)})
    with pytest.raises(FormatError, match="truncated"):
        scan_bytes(tmp_path, blob[:-5])


def test_safetensors_overlapping_offsets(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    with pytest.raises(FormatError, match="overlapping"):
        scan_bytes(tmp_path, make_safetensors(header, bytes(12)))


def test_safetensors_gap_and_bad_lengths(tmp_path: Path) -> None:
    gap = {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}
    with pytest.raises(FormatError, match="belong to no tensor"):
        scan_bytes(tmp_path, make_safetensors(gap, bytes(8)))
    wrong = {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    with pytest.raises(FormatError, match="needs 12 bytes"):
        scan_bytes(tmp_path, make_safetensors(wrong, bytes(8)))
    trailing = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    with pytest.raises(FormatError, match="trailing bytes"):
        scan_bytes(tmp_path, make_safetensors(trailing, bytes(12)))
    with pytest.raises(FormatError, match="not valid UTF-8 JSON"):
        SafetensorsFormat().scan(io.BytesIO(b"\x04\0\0\0\0\0\0\0{abc"), 12)


def test_safetensors_unknown_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 2]}}
    with pytest.raises(FormatError, match=r"tensor 'w' has unknown dtype 'F7'"):
        scan_bytes(tmp_path, make_safetensors(header, bytes(2)))


def test_random_bytes_are_not_a_checkpoint(tmp_path: Path) -> None:
    blob = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    with pytest.raises(FormatError, match="not a checkpoint potluck knows"):
        scan_bytes(tmp_path, blob)
    with pytest.raises(FormatError, match="not a checkpoint potluck knows"):
        scan_bytes(tmp_path, b"", "empty.bin")


# ----------------------------------------------------------------------------- pytorch


def torch_names(obj: object, prefix: str = "") -> dict[str, torch.Tensor]:
    """Reference naming: nested keys joined by '.', list/tuple items by index."""
    if isinstance(obj, torch.Tensor):
        return {prefix or "tensor": obj}
    out: dict[str, torch.Tensor] = {}
    items: Any = obj.items() if isinstance(obj, dict) else None
    if isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    for k, v in items or ():
        out.update(torch_names(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def make_checkpoint() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, generator=gen)
    emb = torch.randn(10, 3, generator=gen).to(torch.bfloat16)
    model = {
        "embed.weight": emb,
        "lm_head.weight": emb,  # tied: the same tensor twice
        "proj.weight": w,
        "proj.weight_t": w.t(),  # non-contiguous view of the same storage
        "rows": w[1:3],  # a slice (storage offset)
        "bias": torch.nn.Parameter(torch.randn(6, generator=gen)),
        "fp8": torch.randn(5, generator=gen).to(torch.float8_e4m3fn),
        "mask": torch.tensor([True, False, True]),
        "ids": torch.arange(7, dtype=torch.int64),
        "u16": torch.tensor([1, 2, 65535], dtype=torch.uint16),
        "half": torch.randn(2, 2, generator=gen).half(),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.5, dtype=torch.float64),
    }
    opt = {
        "state": {0: {"exp_avg": torch.randn(6, generator=gen), "step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "name": None}],
    }
    return {"model": model, "step": 3, "lr": [0.1], "opt": opt, "flag": True, "tag": b"xy"}


def test_torch_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save(make_checkpoint(), path)
    layout = scan_file(path)
    data = check_tiles(path, layout)
    assert layout.format == "pytorch"

    with zipfile.ZipFile(path) as zf:  # torch writes data descriptors after each member
        assert any(info.flag_bits & 0x8 for info in zf.infolist())
    reference = torch_names(torch.load(path, weights_only=True))
    owned = {s.name: s for s in layout.tensor_segments() if not s.name.startswith("storage:")}
    views = {v.name: v for v in layout.views}
    assert not set(owned) & set(views)
    assert set(owned) | set(views) == set(reference)
    # tied and viewed tensors share a storage segment; plain tensors own theirs
    assert {"model.embed.weight", "model.lm_head.weight", "model.proj.weight"} <= set(views)
    assert {"model.rows", "model.proj.weight_t"} <= set(views)
    assert {"model.bias", "model.fp8", "model.u16", "opt.state.0.exp_avg"} <= set(owned)
    assert owned["model.fp8"].dtype == "F8_E4M3" and owned["model.u16"].dtype == "U16"
    assert owned["model.scalar"].shape == () and owned["model.empty"].length == 0
    assert views["model.rows"].offset == 6 and views["model.proj.weight_t"].stride == (1, 6)

    for name, seg in owned.items():
        ref = reference[name]
        assert seg.shape == tuple(ref.shape)
        assert segment_array(data, seg).tobytes() == torch_bytes(ref), name
    for name, view in views.items():
        ref = reference[name]
        assert view.shape == tuple(ref.shape) and view.stride == ref.stride()
        assert view.offset == ref.storage_offset()
        assert view_array(data, layout, view).tobytes() == torch_bytes(ref), name
    float_ref = reference["model.proj.weight_t"].numpy()
    assert np.array_equal(view_array(data, layout, views["model.proj.weight_t"]), float_ref)


def test_torch_bare_tensor_and_archive_name(tmp_path: Path) -> None:
    path = tmp_path / "weird name.bin"
    t = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    torch.save(t, path)
    layout = scan_file(path)
    data = check_tiles(path, layout)
    (seg,) = layout.tensor_segments()
    assert seg.name == "tensor" and seg.dtype == "I32"
    assert np.array_equal(segment_array(data, seg), t.numpy())


def rewrite_zip(blob: bytes, replace: dict[str, bytes]) -> bytes:
    """Copy a zip, replacing the contents of members whose name ends with a key."""
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            content = src.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    content = new
            dst.writestr(info.filename, content)
    return out.getvalue()


def saved(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


class Evil:
    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("echo pwned",))


def test_torch_refuses_code_execution(tmp_path: Path) -> None:
    evil = rewrite_zip(saved({"a": torch.zeros(2)}), {"/data.pkl": pickle.dumps(Evil(), 2)})
    with pytest.raises(FormatError, match=r"pickle needs code execution: \w+\.system"):
        scan_bytes(tmp_path, evil)
    custom = rewrite_zip(saved({"a": torch.zeros(2)}), {"/data.pkl": pickle.dumps(Path("x"))})
    with pytest.raises(FormatError, match=r"needs code execution: pathlib\.\w*Path"):
        scan_bytes(tmp_path, custom)


def test_torch_malformed(tmp_path: Path) -> None:
    blob = saved({"a": torch.zeros(4), "b": torch.ones(3)})
    with pytest.raises(FormatError, match="big-endian"):
        scan_bytes(tmp_path, rewrite_zip(blob, {"/byteorder": b"big"}))
    with pytest.raises(FormatError, match="holds 8 bytes"):
        scan_bytes(tmp_path, rewrite_zip(blob, {"/data/0": bytes(8)}))
    with pytest.raises(FormatError, match="not a readable zip"):
        TorchZipFormat().scan(io.BytesIO(blob[:-30]), len(blob) - 30)
    with pytest.raises(FormatError, match="not a valid weights pickle"):
        scan_bytes(tmp_path, rewrite_zip(blob, {"/data.pkl": b"\x80\x02}q\x00(X"}))


# ----------------------------------------------------------------------------- npz


def test_npz_stored(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    arrays: dict[str, np.ndarray] = {
        "f32": rng.standard_normal((3, 4)).astype(np.float32),
        "f16": rng.standard_normal(5).astype(np.float16),
        "i8": rng.integers(-100, 100, (2, 2, 2), dtype=np.int8),
        "u64": rng.integers(0, 2**63, 3, dtype=np.uint64),
        "c128": (rng.standard_normal(2) + 1j).astype(np.complex128),
        "mask": rng.integers(0, 2, 6).astype(bool),
        "scalar": np.array(3.25),
        "empty": np.zeros((0, 2), np.int32),
        "fortran_1d": np.asfortranarray(np.arange(4.0)),
        "fortran": np.asfortranarray(rng.standard_normal((3, 2))),
        "big": np.arange(4, dtype=">i4"),
        "bf16": np.ones(2, ml_dtypes.bfloat16),  # np.save loses the type: stored as |V2
    }
    path = tmp_path / "a.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    layout = scan_file(path)
    data = check_tiles(path, layout)
    assert layout.format == "npz"
    segs = {s.name: s for s in layout.tensor_segments()}
    untracked = {"fortran", "big", "bf16"}
    assert set(segs) == set(arrays) - untracked
    assert layout.metadata == {
        "untracked:fortran": "fortran order",
        "untracked:big": "big-endian dtype >i4",
        "untracked:bf16": "dtype |V2 has no potluck equivalent",
    }
    with np.load(path) as ref:
        for name, seg in segs.items():
            assert same_bits(segment_array(data, seg), ref[name])


def test_npz_compressed(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = {
        "a": np.arange(1000, dtype=np.float32).reshape(10, 100),
        "b": np.zeros(3, np.int8),
    }
    path = tmp_path / "c.npz"
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    layout = scan_file(path)
    check_tiles(path, layout)
    assert layout.tensor_segments() == []
    assert json.loads(layout.metadata["deflated:a"]) == {"dtype": "F32", "shape": [10, 100]}
    assert json.loads(layout.metadata["deflated:b"]) == {"dtype": "I8", "shape": [3]}


def test_npz_object_array_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.npz"
    np.savez(path, x=np.zeros(2), obj=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(FormatError, match="object array; reading it needs pickle code execution"):
        scan_file(path)


def test_npz_malformed(tmp_path: Path) -> None:
    path = tmp_path / "a.npz"
    np.savez(path, x=np.arange(10.0))
    blob = path.read_bytes()
    with pytest.raises(FormatError, match="not a readable zip"):
        NpzFormat().scan(io.BytesIO(blob[:-10]), len(blob) - 10)
    npy = io.BytesIO()
    np.save(npy, np.arange(10.0))
    short = rewrite_zip(blob, {"x.npy": npy.getvalue()[:-8]})
    with pytest.raises(FormatError, match="holds 72 data bytes"):
        scan_bytes(tmp_path, short, "short.npz")


# ----------------------------------------------------------------------------- corruption


def _sample_files() -> dict[str, bytes]:
    npz, npzc = io.BytesIO(), io.BytesIO()
    np.savez(npz, x=np.arange(5.0), y=np.zeros((2, 2), np.int8))
    np.savez_compressed(npzc, x=np.arange(5.0))
    return {
        "safetensors": safetensors.numpy.save(
            {"a": np.zeros(3, np.float32), "b": np.ones(2, np.int8)}, metadata={"k": "v"}
        ),
        "pytorch": saved({"a": torch.zeros(3), "b": [torch.ones(2, 2).t()], "c": {1: (2, None)}}),
        "npz": npz.getvalue(),
        "npz_compressed": npzc.getvalue(),
    }


_SAMPLES = _sample_files()


@pytest.mark.parametrize("kind", sorted(_SAMPLES))
@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
    keep=st.floats(0.5, 1),
)
def test_corrupted_files_raise_only_format_errors(
    kind: str, edits: list[tuple[float, int]], keep: float
) -> None:
    blob = bytearray(_SAMPLES[kind])
    for where, value in edits:
        blob[int(where * len(blob))] = value
    data = bytes(blob[: max(1, int(keep * len(blob)))])
    fmt = detect(data[:4096], len(data))
    if fmt is None:
        return
    try:
        layout = fmt.scan(io.BytesIO(data), len(data))
    except FormatError:
        return
    assert b"".join(data[s.offset : s.offset + s.length] for s in layout.segments) == data


def test_deferred_formats_are_the_classes_they_stand_for() -> None:
    """pytorch and npz are imported on first use (git's filter starts without zipfile and
    pickle): their stand-ins answer as the classes do, and detection returns the class."""
    for name, cls in (("pytorch", TorchZipFormat), ("npz", NpzFormat)):
        stand_in = FORMATS.get(name)
        assert stand_in.name == cls.name == name
        assert stand_in.needs_random_access is cls.needs_random_access
        assert not stand_in.sniff(b"\x00" * 16, 16)
