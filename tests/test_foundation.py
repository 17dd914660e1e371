"""Registry, repository settings and dtype names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from potluck.config import RepoConfig
from potluck.errors import UserError
from potluck.formats import FORMATS
from potluck.registry import Registry
from potluck.tensors.dtypes import dtype_names, from_numpy, grouping_size, itemsize, to_numpy


def test_registry_refuses_duplicates_and_names_known_ones() -> None:
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1)
    with pytest.raises(UserError, match="widget 'alpha' is already registered"):
        reg.register("alpha", 2)
    with pytest.raises(UserError, match="unknown widget 'alpah'") as e:
        reg.get("alpah")
    assert "did you mean 'alpha'" in str(e.value) and e.value.data["known"] == ["alpha"]
    assert reg.get("alpha") == 1 and reg.names() == ["alpha"]


def test_builtin_formats_registered() -> None:
    assert FORMATS.names() == ["npz", "pytorch", "safetensors"]


def test_config_round_trip_and_validation(tmp_path: Path) -> None:
    assert RepoConfig.load(tmp_path) == RepoConfig()
    cfg = RepoConfig(max_delta_depth=3, chunk_bytes=1 << 16)
    (tmp_path / ".potluck.json").write_text(cfg.to_json())
    assert RepoConfig.load(tmp_path) == cfg
    with pytest.raises(UserError, match=r"unknown keys \['colour'\]"):
        RepoConfig.from_json('{"colour": 1}')
    with pytest.raises(UserError, match="unsupported hash 'md5'"):
        RepoConfig.from_json('{"hash": "md5"}')
    with pytest.raises(UserError, match="chunk_bytes must be a multiple of 64"):
        RepoConfig.from_json('{"chunk_bytes": 1000}')


def test_dtype_names() -> None:
    assert itemsize("BF16") == 2 and itemsize("F8_E4M3") == 1
    assert from_numpy(np.dtype(">f4")) == "F32"
    assert to_numpy("I64") == np.dtype("<i8")
    with pytest.raises(UserError, match="unknown dtype 'F12'"):
        to_numpy("F12")


def test_the_itemsize_table_agrees_with_numpy_and_ml_dtypes() -> None:
    """``itemsize`` answers from a table (no numpy import); numpy's dtypes are the reference."""
    for name in dtype_names():
        assert itemsize(name) == to_numpy(name).itemsize, name
        assert grouping_size(name) == (to_numpy(name).itemsize if name != "C128" else 1)
    with pytest.raises(UserError, match="unknown dtype 'F33'"):
        itemsize("F33")
