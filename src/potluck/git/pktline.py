"""Git pkt-line framing (gitprotocol-common(5)).

A packet is a 4-hex-digit length (counting the 4 length bytes) followed by that many data
bytes, at most ``MAX_DATA`` of them; ``0000`` is the flush packet that ends a list or a
content body. ``PacketReader`` and ``PacketWriter`` stream a content body of any size.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING, BinaryIO, cast

from potluck.errors import GitError

if TYPE_CHECKING:
    from typing_extensions import Buffer

MAX_PACKET = 65520
MAX_DATA = MAX_PACKET - 4
FLUSH = b"0000"


class PktLineError(GitError):
    """The peer sent bytes that are not valid pkt-line framing."""


def _read_exact(stream: BinaryIO, n: int) -> bytes:
    """Read exactly ``n`` bytes; raise ``EOFError`` if the stream ends first."""
    data = stream.read(n)
    if len(data) == n:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError(f"pkt-line stream ended after {got} of {n} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def read_packet(stream: BinaryIO) -> bytes | None:
    """Read one packet: its data, or None for a flush packet. ``EOFError`` at end of stream."""
    size = _data_size(stream)
    return None if size is None else _read_exact(stream, size)


def _data_size(stream: BinaryIO) -> int | None:
    """Read a packet's length: the size of its data, None for a flush packet."""
    head = stream.read(4)
    if len(head) < 4:
        if head:
            head += _read_exact(stream, 4 - len(head))
        else:
            raise EOFError("pkt-line stream ended")
    try:
        size = int(head, 16)
    except ValueError:
        raise PktLineError(
            f"invalid pkt-line length {head!r}",
            hint="the other side is not speaking the git pkt-line protocol",
        ) from None
    if size == 0:
        return None
    if size < 4 or size > MAX_PACKET:
        raise PktLineError(
            f"unsupported pkt-line length {size}",
            hint="the other side is not speaking the git pkt-line protocol",
        )
    return size - 4


def _readinto_exact(stream: BinaryIO, out: memoryview) -> None:
    """Fill ``out`` from ``stream``; ``EOFError`` if the stream ends first."""
    got, fill = 0, cast(io.BufferedIOBase, stream).readinto  # a binary file has it
    while got < len(out):
        n = fill(out[got:])
        if not n:
            raise EOFError(f"pkt-line stream ended after {got} of {len(out)} bytes")
        got += n


def read_text(stream: BinaryIO) -> str | None:
    """Read one text packet without its trailing newline; None for a flush packet."""
    data = read_packet(stream)
    if data is None:
        return None
    if data.endswith(b"\n"):
        data = data[:-1]
    return data.decode("utf-8", "surrogateescape")


def read_text_list(stream: BinaryIO) -> list[str]:
    """Read text packets up to the next flush packet."""
    out: list[str] = []
    while (line := read_text(stream)) is not None:
        out.append(line)
    return out


def read_key_values(stream: BinaryIO) -> dict[str, str]:
    """Read ``key=value`` text packets up to the next flush packet (last value of a key wins)."""
    out: dict[str, str] = {}
    for line in read_text_list(stream):
        key, sep, value = line.partition("=")
        if not sep:
            raise PktLineError(
                f"expected key=value, got {line!r}",
                hint="the other side is not speaking the git filter protocol",
            )
        out[key] = value
    return out


def write_packet(stream: BinaryIO, data: bytes) -> None:
    """Write one data packet (1..``MAX_DATA`` bytes)."""
    if not data or len(data) > MAX_DATA:
        raise ValueError(f"pkt-line data must be 1..{MAX_DATA} bytes, got {len(data)}")
    stream.write(b"%04x" % (len(data) + 4) + data)


def write_text(stream: BinaryIO, text: str) -> None:
    """Write one text packet, newline-terminated."""
    write_packet(stream, text.encode("utf-8", "surrogateescape") + b"\n")


def write_flush(stream: BinaryIO) -> None:
    """Write a flush packet (``0000``)."""
    stream.write(FLUSH)


def write_text_list(stream: BinaryIO, lines: Iterable[str]) -> None:
    """Write text packets followed by a flush packet."""
    for line in lines:
        write_text(stream, line)
    write_flush(stream)


class PacketReader(io.BufferedIOBase):
    """A read-only file over data packets up to the next flush packet.

    ``read(n)`` returns exactly ``n`` bytes unless the body ends first, like a buffered file.
    The flush packet is consumed when reached; ``drain`` skips whatever is left.
    """

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__()
        self._stream = stream
        self._packet = memoryview(b"")
        self._pos = 0
        self.done = False

    def readable(self) -> bool:
        """Always True."""
        return True

    def _fill(self) -> bool:
        """Make sure unread packet data is available; False at the end of the body."""
        while self._pos >= len(self._packet):
            if self.done:
                return False
            data = read_packet(self._stream)
            if data is None:
                self.done = True
                return False
            self._packet, self._pos = memoryview(data), 0
        return True

    def read1(self, size: int | None = -1, /) -> bytes:
        """Read up to ``size`` bytes from at most one packet."""
        if not self._fill():
            return b""
        end = len(self._packet) if size is None or size < 0 else self._pos + size
        chunk = self._packet[self._pos : end]
        self._pos += len(chunk)
        return bytes(chunk)

    def read(self, size: int | None = -1, /) -> bytes:
        """Read ``size`` bytes (all remaining when negative), fewer only at the end."""
        if size is None or size < 0:
            parts = []
            while chunk := self.read1():
                parts.append(chunk)
            return b"".join(parts)
        parts = []
        got = 0
        while got < size and (chunk := self.read1(size - got)):
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto(self, buffer: Buffer, /) -> int:
        """Fill ``buffer`` as far as the body allows; return the number of bytes written. A
        packet that fits in what is left of ``buffer`` is read straight into it."""
        out = memoryview(buffer).cast("B")
        got = 0
        while got < len(out):
            if self._pos >= len(self._packet):
                if self.done:
                    break
                size = _data_size(self._stream)
                if size is None:
                    self.done = True
                    break
                if size <= len(out) - got:
                    _readinto_exact(self._stream, out[got : got + size])
                    got += size
                    continue
                self._packet, self._pos = memoryview(_read_exact(self._stream, size)), 0
            take = min(len(out) - got, len(self._packet) - self._pos)
            out[got : got + take] = self._packet[self._pos : self._pos + take]
            self._pos += take
            got += take
        return got

    def readinto1(self, buffer: Buffer, /) -> int:
        """Like ``readinto`` but from at most one packet."""
        out = memoryview(buffer).cast("B")
        if not out or not self._fill():
            return 0
        take = min(len(out), len(self._packet) - self._pos)
        out[:take] = self._packet[self._pos : self._pos + take]
        self._pos += take
        return take

    def drain(self) -> int:
        """Skip to just after the flush packet; return the number of bytes skipped."""
        skipped = len(self._packet) - self._pos
        self._packet, self._pos = memoryview(b""), 0
        while not self.done:
            data = read_packet(self._stream)
            if data is None:
                self.done = True
            else:
                skipped += len(data)
        return skipped


class PacketWriter:
    """A write-only file that cuts what it is given into full-size data packets.

    Data is buffered until a whole packet (``MAX_DATA`` bytes) is ready, so small writes never
    produce small packets. ``close`` sends the final partial packet but not the flush packet,
    and does not close the underlying stream.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buf = bytearray(MAX_PACKET)
        self._view = memoryview(self._buf)
        self._fill = 0
        self.closed = False
        self.bytes_written = 0

    def writable(self) -> bool:
        """Always True."""
        return True

    def write(self, data: Buffer) -> int:
        """Buffer ``data``, sending every packet that fills up; return ``len(data)``."""
        if self.closed:
            raise ValueError("write to a closed PacketWriter")
        src = memoryview(data).cast("B")
        pos = 0
        while pos < len(src):
            take = min(MAX_DATA - self._fill, len(src) - pos)
            self._view[4 + self._fill : 4 + self._fill + take] = src[pos : pos + take]
            self._fill += take
            pos += take
            if self._fill == MAX_DATA:
                self._emit()
        self.bytes_written += len(src)
        return len(src)

    def _emit(self) -> None:
        if self._fill:
            self._view[:4] = b"%04x" % (self._fill + 4)
            self._stream.write(self._view[: self._fill + 4])
            self._fill = 0

    def flush(self) -> None:
        """Flush the underlying stream; a partial packet stays buffered until ``close``."""
        self._stream.flush()

    def close(self) -> None:
        """Send the remaining buffered data as a last packet (no flush packet)."""
        if not self.closed:
            self._emit()
            self.closed = True

    def __enter__(self) -> PacketWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.closed = True
