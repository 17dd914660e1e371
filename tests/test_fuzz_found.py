"""Crashes the fuzzers found (``python -m fuzz``), each as its minimal reproducer: every one
raised something other than a ``PotluckError`` (a traceback for the user)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from potluck.errors import FormatError
from potluck.formats.safetensors import build_header
from potluck.objects.manifest import parse, parse_lenient
from potluck.ops.patch.fileformat import content_digest, read_patch
from potluck.tensors.digests import base_digest, canonical_json

HEAD = b"potluck manifest v1\n"
OID = hashlib.sha256(b"x").hexdigest()
MANIFEST_HINT = (
    "`potluck fsck` lists every damaged manifest with the commits that hold it; "
    "`potluck fsck --repair` rewrites the work-tree copy in canonical form"
)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (  # RecursionError
            b'{"format":"x","size":0,"metadata":{}}\n' + b"[" * 3000 + b"]" * 3000 + b"\n",
            "manifest is malformed on line 3: maximum recursion depth exceeded while decoding "
            "a JSON array from a unicode string",
        ),
        (  # OverflowError
            b'{"format":"x","size":Infinity,"metadata":{}}\n',
            "manifest is malformed on line 2: cannot convert float infinity to integer",
        ),
        (  # parse: TypeError from sorting the keys 1 and "a"
            b'{"format":"x","size":0,"metadata":[[1,"b"],["a","c"]]}\n',
            "manifest is malformed on line 2: metadata is not a JSON object",
        ),
        (  # OverflowError in a record
            b'{"format":"x","size":0,"metadata":{}}\n{"raw":"'
            + OID.encode()
            + b'","size":-Infinity}\n',
            "manifest is malformed on line 3: cannot convert float infinity to integer",
        ),
    ],
)
def test_malformed_manifests(text: bytes, problem: str) -> None:
    for read in (parse, parse_lenient):
        with pytest.raises(FormatError) as e:
            read(HEAD + text, "m.safetensors")
        assert (e.value.message, e.value.hint) == (f"m.safetensors: {problem}", MANIFEST_HINT)


def _patch(path: Path, error: object) -> None:
    """A one-tensor patch whose entry's ``error`` is ``error``, digests recomputed (a digest is
    a checksum, not a signature: anyone can write a consistent one)."""
    arrays = [("w/data", np.zeros(2, np.float32))]
    entry = {"codec": "full", "meta": {}, "error": error}
    meta = {
        "added": "[]",
        "base": "{}",
        "base_digest": base_digest({}),
        "description": "{}",
        "potluck_patch": "1",
        "removed": "[]",
        "result": "{}",
        "tensors": canonical_json({"w": entry}),
    }
    meta["digest"] = content_digest(meta, arrays)
    path.write_bytes(build_header([("w/data", "F32", (2,))], meta) + bytes(8))


@pytest.mark.parametrize(
    "error",
    [
        {"relative_error": 0.1},  # TypeError: missing arguments
        {"relative_error": [], "max_abs_error": 0, "kept_fraction": 1},  # TypeError: float([])
        [0.1, 0.2, 0.3],  # AttributeError: list has no items()
    ],
)
def test_patch_with_malformed_error_report(tmp_path: Path, error: object) -> None:
    path = tmp_path / "p.patch"
    _patch(path, error)
    with pytest.raises(FormatError) as e:
        read_patch(path)
    assert e.value.message == f"{path}: patch entry for 'w' has a malformed error report"


def _stats(path: Path, **changes: str) -> None:
    meta = {
        "data_sha256": "",
        "description": "{}",
        "input_axes": "{}",
        "kind": "gram",
        "model_digest": "x",
        "model_sha256": "{}",
        "potluck_stats": "1",
        "samples": "3",
        "tensor_sha256": "{}",
        "tokens": "5",
        **changes,
    }
    path.write_bytes(build_header([], dict(sorted(meta.items()))))


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"input_axes": '{"":null}'}, "metadata 'input_axes' holds an axis other than 0 or 1"),
        (
            {"model_sha256": "[" * 3000 + "]" * 3000},
            "metadata 'model_sha256' is missing or not JSON",
        ),
    ],
)
def test_stats_file_with_malformed_metadata(
    tmp_path: Path, changes: dict[str, str], problem: str
) -> None:
    """``TypeError: int() argument must be … not 'NoneType'`` and ``RecursionError``."""
    from potluck.ops.merge.statsfile import load_stats

    path = tmp_path / "s.stats"
    _stats(path, **changes)
    with pytest.raises(FormatError) as e:
        load_stats(path)
    assert e.value.message == f"{path}: {problem}"


def test_tensor_whose_dtype_does_not_divide_its_storage(tmp_path: Path) -> None:
    """A float32 tensor (``_rebuild_tensor_v3``) over a 6-byte ``ByteStorage``: reading it
    raised numpy's ``ValueError`` (found by ``python -m fuzz --atheris torch``)."""
    from fuzz.pickles import archive, compile_pickle
    from potluck.formats import scan_file

    tensor = ("tensor", "0", "ByteStorage", 6, 0, [1], [1], True)
    data, program = compile_pickle(("dict", [(("scalar", "a"), tensor)]), [])
    (tmp_path / "x.pt").write_bytes(archive(data, program.storages))
    with pytest.raises(FormatError) as e:
        scan_file(tmp_path / "x.pt")
    assert e.value.message == (
        f"{tmp_path / 'x.pt'}: pytorch: tensor 'a' (F32) views storage '0' of 6 bytes, which is "
        "not a whole number of F32 items"
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"objects":' + b"[" * 3000 + b"]" * 3000 + b"}",  # RecursionError
        b'{"objects":[{"oid":"%s","size":1,"error":{"code":Infinity}}]}' % OID.encode(),
    ],
)
def test_lfs_batch_answers_nested_or_infinite_are_errors(body: bytes) -> None:
    import httpx

    from potluck.errors import PotluckError
    from potluck.remote import ObjectRef
    from potluck.remote.lfs import parse_batch

    url = "http://lfs.invalid/info/lfs"
    resp = httpx.Response(200, content=body, request=httpx.Request("POST", url + "/objects/batch"))
    with pytest.raises(PotluckError, match="not LFS batch JSON"):
        parse_batch(resp, [ObjectRef(OID, 1)], url)
