"""pkt-line framing and the long-running filter protocol, in-process and wired into real git."""

from __future__ import annotations

import io
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from potluck.errors import UserError
from potluck.git import pktline
from potluck.git.filter_process import PIPE_BYTES, serve, widen_pipe
from potluck.git.pktline import MAX_DATA, MAX_PACKET, PacketReader, PacketWriter

SRC = Path(__file__).resolve().parents[1] / "src"

# -- pkt-line -------------------------------------------------------------------------------


def packet_sizes(raw: bytes) -> list[int]:
    """Total sizes (with the 4 length bytes) of the packets in ``raw``; 0 for flush."""
    sizes, pos = [], 0
    while pos < len(raw):
        n = int(raw[pos : pos + 4], 16)
        sizes.append(n)
        pos += n if n else 4
    assert pos == len(raw)
    return sizes


@settings(max_examples=60, deadline=None)
@given(
    body=st.binary(max_size=200 * 1024),
    chunks=st.lists(st.integers(min_value=1, max_value=70000), min_size=1, max_size=8),
    reads=st.integers(min_value=1, max_value=100000),
)
def test_packet_round_trip(body: bytes, chunks: list[int], reads: int) -> None:
    out = io.BytesIO()
    writer = PacketWriter(out)
    pos, i = 0, 0
    while pos < len(body):  # write in irregular pieces
        step = chunks[i % len(chunks)]
        writer.write(body[pos : pos + step])
        pos, i = pos + step, i + 1
    writer.close()
    pktline.write_flush(out)
    out.write(b"0009after")  # what follows the body must stay unread
    raw = out.getvalue()
    sizes = packet_sizes(raw)
    assert all(4 < s <= MAX_PACKET for s in sizes[:-2])
    assert all(s == MAX_PACKET for s in sizes[:-3])  # only the last data packet is partial
    assert sizes[-2:] == [0, 9]

    stream = io.BytesIO(raw)
    reader = PacketReader(stream)
    got = bytearray()
    while chunk := reader.read(reads):
        assert len(chunk) == reads or reader.read(1) == b""
        got += chunk
    assert bytes(got) == body
    assert reader.read() == b""
    assert pktline.read_packet(stream) == b"after"


@settings(max_examples=60, deadline=None)
@given(
    parts=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
    sizes=st.lists(st.integers(min_value=1, max_value=900), min_size=1, max_size=6),
)
def test_readinto_fills_buffers_across_packets_and_stops_at_the_flush(
    parts: list[bytes], sizes: list[int]
) -> None:
    """``readinto`` (packets that fit read straight into the buffer, the others through the
    reader's own) gives the body in order, whatever the buffer sizes, and leaves what follows
    the flush packet unread; a stream cut inside a packet is an ``EOFError``."""
    out = io.BytesIO()
    for part in parts:
        pktline.write_packet(out, part)
    pktline.write_flush(out)
    pktline.write_text(out, "after")
    stream = io.BytesIO(out.getvalue())
    reader, got, i = PacketReader(stream), bytearray(), 0
    while n := reader.readinto(buf := bytearray(sizes[i % len(sizes)])):
        got += buf[:n]
        i += 1
    assert bytes(got) == b"".join(parts)
    assert pktline.read_text(stream) == "after"
    if parts:
        cut = io.BytesIO(out.getvalue()[: 4 + len(parts[0]) - 1])
        with pytest.raises(EOFError):
            PacketReader(cut).readinto(bytearray(1000))


def test_packet_reader_apis() -> None:
    out = io.BytesIO()
    for part in (b"hello ", b"wor", b"ld"):
        pktline.write_packet(out, part)
    pktline.write_flush(out)
    pktline.write_text(out, "next")
    raw = out.getvalue()
    r = PacketReader(io.BytesIO(raw))
    assert r.read1(100) == b"hello "
    buf = bytearray(4)
    assert r.readinto(buf) == 4 and bytes(buf) == b"worl"
    assert r.read() == b"d"
    stream = io.BytesIO(raw)
    r = PacketReader(stream)
    assert r.read(2) == b"he"
    assert r.drain() == 9
    assert r.done and r.read() == b""
    assert pktline.read_text(stream) == "next"
    with pytest.raises(EOFError):
        pktline.read_packet(stream)


def test_packet_framing_errors() -> None:
    with pytest.raises(ValueError):
        pktline.write_packet(io.BytesIO(), b"x" * (MAX_DATA + 1))
    with pytest.raises(ValueError):
        pktline.write_packet(io.BytesIO(), b"")
    with pytest.raises(pktline.PktLineError):
        pktline.read_packet(io.BytesIO(b"zzzz"))
    with pytest.raises(pktline.PktLineError):
        pktline.read_packet(io.BytesIO(b"fff1" + b"x" * 70000))
    with pytest.raises(EOFError):
        pktline.read_packet(io.BytesIO(b"000ashort"))
    with pytest.raises(EOFError):
        pktline.read_packet(io.BytesIO(b"00"))
    out = io.BytesIO()
    pktline.write_text_list(out, ["command=clean", "pathname=a=b c"])
    assert pktline.read_key_values(io.BytesIO(out.getvalue())) == {
        "command": "clean",
        "pathname": "a=b c",
    }


def test_packet_writer_small_writes_make_full_packets() -> None:
    out = io.BytesIO()
    with PacketWriter(out) as w:
        for _ in range(200_000):
            w.write(b"x")
        w.flush()  # does not cut a partial packet
    assert packet_sizes(out.getvalue()) == [
        MAX_PACKET,
        MAX_PACKET,
        MAX_PACKET,
        200_000 - 3 * MAX_DATA + 4,
    ]
    with pytest.raises(ValueError):
        w.write(b"late")


# -- the filter protocol in-process ---------------------------------------------------------


class CaseHandler:
    """clean = upper-case, smudge = lower-case; a path containing "fail" raises."""

    def clean(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        if "fail" in pathname:
            src.read(3)
            raise UserError(f"cannot clean {pathname}", hint="rename the file")
        data = src.read()  # the whole input before the first write (the handler contract)
        for i in range(0, len(data), 1 << 20):
            dst.write(data[i : i + (1 << 20)].upper())

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        data = src.read()
        if "late-fail" in pathname:
            dst.write(data[:10])
            raise UserError("failed after writing")
        dst.write(data.lower())


def git_side(requests: list[tuple[str, str, bytes]]) -> bytes:
    """What git sends: handshake, then (command, pathname, content) requests."""
    out = io.BytesIO()
    pktline.write_text_list(out, ["git-filter-client", "version=2"])
    pktline.write_text_list(out, ["capability=clean", "capability=smudge", "capability=delay"])
    for command, path, content in requests:
        pktline.write_text_list(out, [f"command={command}", f"pathname={path}", "ref=x"])
        with PacketWriter(out) as w:
            w.write(content)
        pktline.write_flush(out)
    return out.getvalue()


def test_serve_in_process() -> None:
    big = os.urandom(300_000)
    stdin = io.BytesIO(
        git_side(
            [
                ("clean", "a.txt", b"Hello"),
                ("clean", "fail.txt", b"x" * 100_000),
                ("smudge", "b c.txt", b"WORLD"),
                ("clean", "empty", b""),
                ("clean", "big", big),
            ]
        )
    )
    stdout = io.BytesIO()
    logs: list[str] = []
    assert serve(CaseHandler(), stdin, stdout, logs.append) == 0
    resp = io.BytesIO(stdout.getvalue())
    assert pktline.read_text_list(resp) == ["git-filter-server", "version=2"]
    assert pktline.read_text_list(resp) == ["capability=clean", "capability=smudge"]

    def answer() -> tuple[list[str], bytes | None]:
        status = pktline.read_text_list(resp)
        if status != ["status=success"]:
            return status, None
        body = PacketReader(resp).read()
        assert pktline.read_text_list(resp) == []
        return status, body

    assert answer() == (["status=success"], b"HELLO")
    assert answer() == (["status=error"], None)
    assert answer() == (["status=success"], b"world")
    assert answer() == (["status=success"], b"")
    assert answer() == (["status=success"], big.upper())
    assert resp.read() == b""
    assert len(logs) == 1
    assert "cannot clean fail.txt" in logs[0] and "hint: rename the file" in logs[0]


def test_serve_rejects_bad_handshake_and_truncation() -> None:
    logs: list[str] = []
    bad = io.BytesIO()
    pktline.write_text_list(bad, ["git-filter-client", "version=3"])
    assert serve(CaseHandler(), io.BytesIO(bad.getvalue()), io.BytesIO(), logs.append) == 1
    assert "need 2" in logs[-1]
    assert serve(CaseHandler(), io.BytesIO(b""), io.BytesIO(), logs.append) == 1
    cut = git_side([("clean", "a.txt", b"x" * 1000)])[:-10]
    assert serve(CaseHandler(), io.BytesIO(cut), io.BytesIO(), logs.append) == 1
    assert "middle of a request" in logs[-1]


# -- the filter wired into real git ---------------------------------------------------------

HELPER = """
import sys
sys.path.insert(0, {src!r})
from potluck.errors import UserError
from potluck.git.filter_process import serve_stdio

class CaseHandler:
    def clean(self, pathname, src, dst):
        if "fail" in pathname:
            src.read(3)
            raise UserError(f"cannot clean {{pathname}}", hint="rename the file")
        dst.write(src.read().upper())

    def smudge(self, pathname, src, dst):
        if pathname == "pipes.txt":  # the capacity of the pipes git talks to us through
            import fcntl
            src.read()
            sizes = [fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) for fd in (0, 1)]
            dst.write(" ".join(map(str, sizes)).encode())
            return
        dst.write(src.read().lower())

sys.exit(serve_stdio(CaseHandler()))
"""


def git(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=check)


@pytest.fixture
def filtered_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    script = tmp_path / "case_filter.py"
    script.write_text(HELPER.format(src=str(SRC)))
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "T")
    git(root, "config", "user.email", "t@example.com")
    git(
        root,
        "config",
        "filter.t.process",
        f"{shlex.quote(sys.executable)} {shlex.quote(str(script))}",
    )
    git(root, "config", "filter.t.required", "true")
    (root / ".gitattributes").write_text("*.txt filter=t\n")
    return root


def test_real_git_clean_and_smudge(filtered_repo: Path) -> None:
    root = filtered_repo
    (root / "a.txt").write_bytes(b"Hello World\n")
    (root / "b c.txt").write_bytes(b"Second File\n")
    git(root, "add", ".gitattributes", "a.txt", "b c.txt")
    assert git(root, "cat-file", "-p", ":a.txt").stdout == b"HELLO WORLD\n"
    assert git(root, "cat-file", "-p", ":b c.txt").stdout == b"SECOND FILE\n"
    git(root, "commit", "-q", "-m", "c")
    (root / "a.txt").unlink()
    (root / "b c.txt").unlink()
    git(root, "checkout", "--", "a.txt", "b c.txt")
    assert (root / "a.txt").read_bytes() == b"hello world\n"
    assert (root / "b c.txt").read_bytes() == b"second file\n"


def test_real_git_failure_is_reported(filtered_repo: Path) -> None:
    root = filtered_repo
    (root / "fail.txt").write_bytes(b"x" * 200_000)
    (root / "ok.txt").write_bytes(b"fine\n")
    proc = git(root, "add", "fail.txt", check=False)
    assert proc.returncode != 0
    err = proc.stderr.decode()
    assert "cannot clean fail.txt" in err and "hint: rename the file" in err
    git(root, "add", "ok.txt")
    assert git(root, "cat-file", "-p", ":ok.txt").stdout == b"FINE\n"

    # not required: git keeps going in the same process after the error
    git(root, "config", "filter.t.required", "false")
    (root / "a_fail.txt").write_bytes(b"raw\n")
    (root / "b.txt").write_bytes(b"later\n")
    proc = git(root, "add", "a_fail.txt", "b.txt")
    assert "cannot clean a_fail.txt" in proc.stderr.decode()
    assert git(root, "cat-file", "-p", ":a_fail.txt").stdout == b"raw\n"
    assert git(root, "cat-file", "-p", ":b.txt").stdout == b"LATER\n"


def test_real_git_large_file(filtered_repo: Path) -> None:
    root = filtered_repo
    table = bytes(ord("a") + i % 26 for i in range(256))
    data = os.urandom(20 * 1024 * 1024).translate(table)
    (root / "big.txt").write_bytes(data)
    git(root, "add", "big.txt")
    assert git(root, "cat-file", "-p", ":big.txt").stdout == data.upper()
    git(root, "commit", "-q", "-m", "big")
    (root / "big.txt").unlink()
    git(root, "checkout", "--", "big.txt")
    assert (root / "big.txt").read_bytes() == data


def test_failure_after_partial_output_is_reported_as_error() -> None:
    stdin = io.BytesIO(
        git_side([("smudge", "late-fail.bin", b"ABCDEFGHIJKLMNOP"), ("smudge", "next.bin", b"OK")])
    )
    stdout = io.BytesIO()
    logs: list[str] = []
    assert serve(CaseHandler(), stdin, stdout, logs.append) == 0
    resp = io.BytesIO(stdout.getvalue())
    pktline.read_text_list(resp)
    pktline.read_text_list(resp)
    assert pktline.read_text_list(resp) == ["status=success"]
    assert PacketReader(resp).read() == b"ABCDEFGHIJ"  # partial content …
    assert pktline.read_text_list(resp) == ["status=error"]  # … then the error: git discards it
    assert pktline.read_text_list(resp) == ["status=success"]
    assert PacketReader(resp).read() == b"ok"
    assert pktline.read_text_list(resp) == []
    assert "failed after writing" in logs[0]


LINUX_PIPES = pytest.mark.skipif(sys.platform != "linux", reason="pipe capacity is Linux's")


@LINUX_PIPES
def test_widen_pipe() -> None:
    import fcntl

    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 64 * 1024  # Linux's default
        assert widen_pipe(w) == PIPE_BYTES == fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
        assert widen_pipe(r, 128 * 1024) == 128 * 1024 == fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(r)
        os.close(w)
    with open(os.devnull, "rb") as f:  # not a pipe: nothing to widen
        assert widen_pipe(f.fileno()) == 0


@LINUX_PIPES
def test_real_git_pipes_are_widened(filtered_repo: Path) -> None:
    root = filtered_repo
    (root / "pipes.txt").write_bytes(b"x\n")
    git(root, "add", "pipes.txt")
    git(root, "commit", "-q", "-m", "p")
    (root / "pipes.txt").unlink()
    git(root, "checkout", "--", "pipes.txt")
    assert (root / "pipes.txt").read_bytes() == f"{PIPE_BYTES} {PIPE_BYTES}".encode()


@pytest.mark.parametrize(
    ("stdin", "message"),
    [
        (b"", "potluck filter: git closed the pipe during the handshake"),
        (b"garbage", "potluck filter: invalid pkt-line length b'garb'"),
    ],
)
def test_the_filter_process_exits_with_its_code_and_flushed_message(
    tmp_path: Path, stdin: bytes, message: str
) -> None:
    """``git-potluck filter-process`` skips the interpreter's teardown (``os._exit``) but
    still exits 1 on a broken handshake, with its message flushed to stderr."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    proc = subprocess.run(
        ["git-potluck", "filter-process"], input=stdin, cwd=tmp_path, capture_output=True
    )
    assert (proc.returncode, proc.stdout) == (1, b"")
    assert proc.stderr.decode().splitlines()[0] == message
