"""The manifest is canonical text: golden bytes, strict parsing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import FormatError
from potluck.objects.manifest import Manifest, RawEntry, TensorEntry, dumps, parse
from potluck.tensors.views import View

A = "a" * 64
B = "b" * 64

GOLDEN = (
    b"potluck manifest v1\n"
    b'{"format":"safetensors","size":104,"metadata":{"k":"v"}}\n'
    b'{"raw":"' + A.encode() + b'","size":80}\n'
    b'{"tensor":"w","dtype":"BF16","shape":[3,4],"oid":"' + B.encode() + b'","size":24}\n'
    b'{"view":"w.T","storage":"w","dtype":"BF16","shape":[4,3],"stride":[1,4],"offset":0}\n'
)


def sample() -> Manifest:
    return Manifest(
        "safetensors",
        104,
        (RawEntry(A, 80), TensorEntry("w", "BF16", (3, 4), B, 24)),
        (View("w.T", "w", "BF16", (4, 3), (1, 4), 0),),
        {"k": "v"},
    )


def test_golden_bytes() -> None:
    assert dumps(sample()) == GOLDEN
    assert parse(GOLDEN) == sample()


def test_non_canonical_text_is_refused() -> None:
    with pytest.raises(FormatError, match="not in canonical form"):
        parse(GOLDEN.replace(b'"size":80}', b'"size": 80}'))
    with pytest.raises(FormatError, match="do not add up"):
        parse(GOLDEN.replace(b'"size":104', b'"size":105'))
    with pytest.raises(FormatError, match="bad object id"):
        parse(GOLDEN.replace(A.encode(), b"z" * 64))
    with pytest.raises(FormatError, match="not a potluck manifest"):
        parse(b"hello")


def test_metadata_order_does_not_change_bytes() -> None:
    m1 = Manifest("npz", 0, (), (), {"b": "1", "a": "2"})
    m2 = Manifest("npz", 0, (), (), {"a": "2", "b": "1"})
    assert dumps(m1) == dumps(m2)


def test_records_must_be_one_per_line_even_when_the_lines_join_into_valid_json() -> None:
    """``parse`` decodes all lines as one JSON array first; a record split over two lines
    next to two records on one line has the right count but is still refused (by line)."""
    entry = b'{"tensor":"w","dtype":"BF16","shape":[3,4],"oid":"' + B.encode() + b'","size":24}'
    split = b'{"raw":"' + A.encode() + b'","size":80},{"tensor":"w","dtype":"BF16","shape":[3\n'
    rest = b'4],"oid":"' + B.encode() + b'","size":24}\n'
    text = GOLDEN.replace(
        b'{"raw":"' + A.encode() + b'","size":80}\n' + entry + b"\n", split + rest
    )
    with pytest.raises(FormatError, match="manifest is malformed on line 3"):
        parse(text)


@pytest.mark.parametrize("shape", [b"[true,4]", b"[3,-4]", b"[3.0,4]", b'"34"'])
def test_a_shape_is_a_list_of_non_negative_integers(shape: bytes) -> None:
    with pytest.raises(FormatError, match="bad shape"):
        parse(GOLDEN.replace(b'"shape":[3,4]', b'"shape":' + shape))


def _reference_line(e: RawEntry | TensorEntry) -> str:
    """A manifest line as the format defines it: the record through ``json.dumps``."""
    import json

    if isinstance(e, RawEntry):
        record: dict[str, object] = {"raw": e.oid, "size": e.size}
    else:
        record = {
            "tensor": e.name, "dtype": e.dtype, "shape": list(e.shape), "oid": e.oid,
            "size": e.size,
        }  # fmt: skip
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True)


_NAMES = st.text(min_size=1, max_size=8) | st.sampled_from(['a"b', "\\", "\x1b]0;t\x07", "é"])
_DIMS = st.lists(st.integers(0, 9) | st.booleans(), max_size=3).map(tuple)
_ENTRIES = st.lists(
    st.builds(RawEntry, st.just(A), st.integers(0, 99))
    | st.builds(
        TensorEntry,
        _NAMES,
        st.sampled_from(["F32", "BF16"]),
        _DIMS,
        st.just(B),
        st.integers(0, 99) | st.booleans(),
    ),
    min_size=1,
    max_size=12,
)


@settings(derandomize=True, deadline=None, max_examples=150)
@given(_ENTRIES)
def test_entry_lines_are_the_records_through_json_dumps(
    entries: list[RawEntry | TensorEntry],
) -> None:
    """The entries' lines (tensor entries formatted together in bulk) are exactly the records
    through ``json.dumps``: names escaped, a bool dimension or size printed as JSON's bool."""
    m = Manifest("safetensors", 0, tuple(entries))
    lines = dumps(m).decode("ascii").split("\n")[2:-1]
    assert lines == [_reference_line(e) for e in entries]
