"""Git's long-running filter process protocol (gitattributes(5), "Long Running Filter Process").

``serve`` speaks protocol version 2 with the ``clean`` and ``smudge`` capabilities (never
``delay``). Each request's content is streamed to the handler through a ``PacketReader``; the
handler's output is streamed back as it is written (a handler reads all the input it needs before
its first write). A failure, even after part of the content was sent, is reported as
``status=error`` so git discards the output. stdout is the protocol channel:
nothing but packets is ever written to it; diagnostics go through ``log``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast

from potluck.errors import PotluckError
from potluck.git.pktline import (
    PacketReader,
    PacketWriter,
    read_key_values,
    read_text_list,
    write_flush,
    write_text,
    write_text_list,
)

IO_BUFFER = 1 << 20
CAPABILITIES = ("clean", "smudge")


class FilterHandler(Protocol):
    """What the filter does to one file's content."""

    def clean(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Turn worktree content (``src``) into the blob git stores (written to ``dst``)."""

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Turn a stored blob (``src``) into worktree content (written to ``dst``)."""


class ProtocolError(PotluckError):
    """Git sent something this filter does not understand."""


def _one_line(text: str) -> str:
    """``text`` (a path from git) with newlines, carriage returns and tabs escaped, so that
    it cannot start a log line of its own."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _stderr_log(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def handshake(stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Perform the version and capability negotiation; raise ``ProtocolError`` on mismatch."""
    hint = "this git is too old or too new for potluck's filter; use git >= 2.11"
    welcome = read_text_list(stdin)
    if not welcome or welcome[0] != "git-filter-client":
        raise ProtocolError(f"unexpected filter handshake {welcome!r}", hint=hint)
    if "version=2" not in welcome[1:]:
        raise ProtocolError(f"git offers filter protocol {welcome[1:]!r}, need 2", hint=hint)
    write_text_list(stdout, ["git-filter-server", "version=2"])
    stdout.flush()
    offered = {line.removeprefix("capability=") for line in read_text_list(stdin)}
    ours = [c for c in CAPABILITIES if c in offered]
    if not ours:
        raise ProtocolError(f"git offers no usable filter capability: {offered!r}", hint=hint)
    write_text_list(stdout, [f"capability={c}" for c in ours])
    stdout.flush()


class _Response(io.RawIOBase):
    """The handler's output, streamed to git as it is written.

    The first write drains the request's remaining input (git sends all of it before reading
    the answer, so a handler must have read what it needs by then) and sends ``status=success``.
    A failure after that is still reported: the content is ended and ``status=error`` follows,
    which makes git discard what it received.
    """

    def __init__(self, src: PacketReader, stdout: BinaryIO) -> None:
        super().__init__()
        self.src = src
        self.stdout = stdout
        self.writer: PacketWriter | None = None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        if self.writer is None:
            self.src.drain()
            write_text(self.stdout, "status=success")
            write_flush(self.stdout)
            self.writer = PacketWriter(self.stdout)
        return self.writer.write(data)

    def finish(self, ok: bool) -> None:
        """End the answer: content flush plus the final status list."""
        if self.writer is None:
            self.src.drain()
            if not ok:
                _send_error(self.stdout)
                return
            write_text(self.stdout, "status=success")
            write_flush(self.stdout)
            self.writer = PacketWriter(self.stdout)
        self.writer.close()
        write_flush(self.stdout)  # end of content
        if ok:
            write_flush(self.stdout)  # empty list: keep status=success
        else:
            _send_error(self.stdout)
        self.stdout.flush()


def _send_error(stdout: BinaryIO) -> None:
    write_text(stdout, "status=error")
    write_flush(stdout)
    stdout.flush()


def _handle(
    handler: FilterHandler,
    request: dict[str, str],
    stdin: BinaryIO,
    stdout: BinaryIO,
    log: Callable[[str], None],
) -> None:
    """Answer one request (its key/values already read)."""
    command = request.get("command", "")
    pathname = request.get("pathname", "")
    src = PacketReader(stdin)
    if command not in CAPABILITIES:
        log(f"potluck filter: unsupported command {command!r} for {pathname!r}")
        src.drain()
        _send_error(stdout)
        return
    action = handler.clean if command == "clean" else handler.smudge
    dst = _Response(src, stdout)
    try:
        action(pathname, cast(BinaryIO, src), cast(BinaryIO, dst))
    except Exception as e:  # report any handler failure to git, then keep serving
        detail = str(e) if isinstance(e, PotluckError) else f"{type(e).__name__}: {e}"
        shown = _one_line(pathname)
        if pathname:  # messages name the file too
            detail = detail.replace(pathname, shown)
        log(f"potluck {command} failed for {shown}: {detail}")
        dst.finish(ok=False)
        return
    dst.finish(ok=True)


def serve(
    handler: FilterHandler,
    stdin: BinaryIO,
    stdout: BinaryIO,
    log: Callable[[str], None] = _stderr_log,
) -> int:
    """Run the filter protocol until git closes ``stdin``; return the process exit code.

    ``stdin``/``stdout`` should be buffered binary streams (see ``serve_stdio``). Handler
    exceptions are reported to git as ``status=error`` and logged; serving continues.
    """
    try:
        handshake(stdin, stdout)
    except EOFError:
        log("potluck filter: git closed the pipe during the handshake")
        return 1
    except PotluckError as e:
        log(f"potluck filter: {e}")
        return 1
    while True:
        try:
            request = read_key_values(stdin)
        except EOFError:
            return 0
        try:
            _handle(handler, request, stdin, stdout, log)
        except EOFError:
            log("potluck filter: git closed the pipe in the middle of a request")
            return 1
        except BrokenPipeError:
            log("potluck filter: git stopped reading the filter's output")
            return 1
        except PotluckError as e:  # broken framing: the stream cannot be resynchronised
            log(f"potluck filter: {e}")
            return 1


def serve_stdio(handler: FilterHandler, log: Callable[[str], None] = _stderr_log) -> int:
    """``serve`` on file descriptors 0 and 1 with large buffers.

    Nothing else in the process may write to stdout (``print`` would corrupt the protocol).
    """
    stdin = open(0, "rb", buffering=IO_BUFFER, closefd=False)  # noqa: SIM115
    stdout = open(1, "wb", buffering=IO_BUFFER, closefd=False)  # noqa: SIM115
    try:
        return serve(handler, stdin, stdout, log)
    finally:
        with contextlib.suppress(BrokenPipeError):
            stdout.flush()
