"""Bad input and damaged stores: clear errors, nothing half-written, fsck names the damage."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import numpy as np

from conftest import Run, model, save_st
from test_vcs import commit, objects


def _stored_oids(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in objects(repo)}


def test_flipped_byte_is_named_by_fsck_and_fails_checkout(repo: Path, git: Run, rng) -> None:
    t = model(rng)
    data = save_st(repo / "m.safetensors", t)
    c1 = commit(git, "m.safetensors", "v1")
    m = git("git", "cat-file", "-p", ":m.safetensors")
    oid = next(
        json.loads(line)["oid"]
        for line in m.splitlines()[2:]
        if json.loads(line).get("tensor") == "layers.1.w"
    )
    obj = repo / ".git" / "potluck" / "objects" / oid[:2] / oid[2:]
    raw = bytearray(obj.read_bytes())
    raw[-10] ^= 0xFF
    os.chmod(obj, 0o644)
    obj.write_bytes(bytes(raw))
    out = git("potluck", "fsck", check=False)
    assert f"corrupt object {oid[:12]}" in out
    assert "tensor layers.1.w" in out and c1[:10] in out
    (repo / "m.safetensors").unlink()
    err = git("git", "checkout", "--", "m.safetensors", check=False)
    assert "layers.1.w" in err and "potluck fsck" in err
    assert not (repo / "m.safetensors").exists() or (repo / "m.safetensors").read_bytes() != data


def _bad_safetensors(kind: str, good: bytes) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + n])
    if kind == "header_past_end":
        return struct.pack("<Q", len(good) * 10) + good[8:]
    if kind == "truncated":
        return good[:-7]
    if kind == "overlap":
        names = sorted(k for k in header if k != "__metadata__")
        header[names[1]]["data_offsets"] = header[names[0]]["data_offsets"]
        h = json.dumps(header).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + good[8 + n :]
    raise AssertionError(kind)


def test_malformed_files_are_refused_and_nothing_is_stored(repo: Path, git: Run, rng) -> None:
    good = save_st(
        repo / "ok.safetensors", {"a": np.ones(4, np.float32), "b": np.zeros(4, np.float32)}
    )
    (repo / "ok.safetensors").unlink()
    before = _stored_oids(repo)
    cases = {"header_past_end": "past the end", "truncated": "", "overlap": "overlap"}
    for kind, needle in cases.items():
        (repo / "bad.safetensors").write_bytes(_bad_safetensors(kind, good))
        err = git("git", "add", "bad.safetensors", check=False)
        assert "bad.safetensors" in err and needle in err.lower(), (kind, err)
        assert _stored_oids(repo) == before, kind
    (repo / "bad.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    err = git("git", "add", "bad.pt", check=False)
    assert "bad.pt" in err
    assert git("git", "diff", "--cached", "--name-only") == ""


def test_pickle_needing_code_execution_is_refused(repo: Path, git: Run, tmp_path: Path) -> None:
    import pickle
    import zipfile

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("echo pwned",))

    path = repo / "evil.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}, protocol=2))
        z.writestr("archive/version", "3\n")
    err = git("git", "add", "evil.pt", check=False)
    assert "code execution" in err and "system" in err
    assert git("git", "diff", "--cached", "--name-only") == ""


def test_killed_filter_leaves_no_partial_object(repo: Path, git: Run, rng) -> None:
    big = {f"t{i}": rng.normal(size=(1024, 1024)).astype(np.float32) for i in range(12)}
    data = save_st(repo / "big.safetensors", big)
    for delay in (0.2, 0.5, 0.9):
        p = subprocess.Popen(
            ["potluck", "clean", "big.safetensors"],
            cwd=repo,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            assert p.stdin is not None
            p.stdin.write(data)
            p.stdin.close()
        except BrokenPipeError:
            pass
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert "ok" in git("potluck", "fsck")
    commit(git, "big.safetensors", "big")
    (repo / "big.safetensors").unlink()
    git("git", "checkout", "--", "big.safetensors")
    assert (repo / "big.safetensors").read_bytes() == data
    assert "ok" in git("potluck", "fsck")
