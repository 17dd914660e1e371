"""Git's long-running filter process protocol (gitattributes(5), "Long Running Filter Process").

``serve`` speaks protocol version 2 with the ``clean`` and ``smudge`` capabilities, and
``delay`` when the handler can delay smudges (``DelayingHandler``) and git offers it: a smudge
sent with ``can-delay=1`` may be answered ``status=delayed``; git later asks
``list_available_blobs`` and requests each listed path again (with empty content).
Each request's content is streamed to the handler through a ``PacketReader``; the handler's
output is streamed back as it is written (a handler reads all the input it needs before its
first write). A failure, even after part of the content was sent, is reported as
``status=error`` so git discards the output. stdout is the protocol channel:
nothing but packets is ever written to it; diagnostics go through ``log``.
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol, cast, runtime_checkable

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
#: what the filter asks Linux for as the capacity of its pipes to and from git (the default is
#: 64 KiB: a 500 MB smudge then blocks ~8000 times on git draining one packet at a time)
PIPE_BYTES = 1 << 20
CAPABILITIES = ("clean", "smudge")
DELAY = "delay"
LIST_AVAILABLE = "list_available_blobs"


class FilterHandler(Protocol):
    """What the filter does to one file's content."""

    def clean(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Turn worktree content (``src``) into the blob git stores (written to ``dst``)."""

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """Turn a stored blob (``src``) into worktree content (written to ``dst``)."""


@runtime_checkable
class DelayingHandler(Protocol):
    """A ``FilterHandler`` that can put smudges off and answer them together later."""

    def clean(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """As ``FilterHandler.clean``."""

    def smudge(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> None:
        """As ``FilterHandler.smudge``; also answers a path delayed earlier (``src`` empty)."""

    def smudge_or_delay(self, pathname: str, src: BinaryIO, dst: BinaryIO) -> bool:
        """Smudge now (return False) or keep the request for later without writing anything
        to ``dst`` (return True)."""

    def available_blobs(self) -> list[str]:
        """Make delayed paths ready (waiting as long as needed) and name them; an empty list
        once nothing is delayed any more. Must not raise for a failed download: each path it
        names is then answered as well as it can be (a manifest left as it is)."""


class ProtocolError(PotluckError):
    """Git sent something this filter does not understand."""


def _one_line(text: str) -> str:
    """``text`` (a path from git) with newlines, carriage returns and tabs escaped, so that
    it cannot start a log line of its own."""
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def _stderr_log(message: str) -> None:
    sys.stderr.write(message.rstrip("\n") + "\n")
    sys.stderr.flush()


def handshake(
    stdin: BinaryIO, stdout: BinaryIO, capabilities: tuple[str, ...] = CAPABILITIES
) -> list[str]:
    """Perform the version and capability negotiation; return the capabilities agreed on;
    raise ``ProtocolError`` on mismatch."""
    hint = "this git is too old or too new for potluck's filter; use git >= 2.11"
    welcome = read_text_list(stdin)
    if not welcome or welcome[0] != "git-filter-client":
        raise ProtocolError(f"unexpected filter handshake {welcome!r}", hint=hint)
    if "version=2" not in welcome[1:]:
        raise ProtocolError(f"git offers filter protocol {welcome[1:]!r}, need 2", hint=hint)
    write_text_list(stdout, ["git-filter-server", "version=2"])
    stdout.flush()
    offered = {line.removeprefix("capability=") for line in read_text_list(stdin)}
    ours = [c for c in capabilities if c in offered]
    if not [c for c in ours if c in CAPABILITIES]:
        raise ProtocolError(f"git offers no usable filter capability: {offered!r}", hint=hint)
    write_text_list(stdout, [f"capability={c}" for c in ours])
    stdout.flush()
    return ours


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
    delay: bool = False,
) -> None:
    """Answer one request (its key/values already read); ``delay``: git agreed to delays."""
    command = request.get("command", "")
    pathname = request.get("pathname", "")
    if command == LIST_AVAILABLE and delay:  # no content section follows
        _list_available(cast(DelayingHandler, handler), stdout, log)
        return
    src = PacketReader(stdin)
    if command not in CAPABILITIES:
        log(f"potluck filter: unsupported command {command!r} for {pathname!r}")
        src.drain()
        _send_error(stdout)
        return
    dst = _Response(src, stdout)
    try:
        if command == "smudge" and delay and request.get("can-delay") == "1":
            delaying = cast(DelayingHandler, handler)
            if delaying.smudge_or_delay(pathname, cast(BinaryIO, src), cast(BinaryIO, dst)):
                _send_delayed(src, stdout)
                return
        else:
            action = handler.clean if command == "clean" else handler.smudge
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


def _send_delayed(src: PacketReader, stdout: BinaryIO) -> None:
    """Answer ``status=delayed`` (after the request's remaining content)."""
    src.drain()
    write_text(stdout, "status=delayed")
    write_flush(stdout)
    stdout.flush()


def _list_available(handler: DelayingHandler, stdout: BinaryIO, log: Callable[[str], None]) -> None:
    """Answer ``list_available_blobs``: the paths now ready, then ``status=success``."""
    try:
        names = handler.available_blobs()
    except Exception as e:  # a bug: git then gives up on the delayed paths, and says so
        log(f"potluck filter: preparing delayed files failed: {type(e).__name__}: {e}")
        write_flush(stdout)
        _send_error(stdout)
        return
    write_text_list(stdout, [f"pathname={n}" for n in names])
    write_text(stdout, "status=success")
    write_flush(stdout)
    stdout.flush()


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
    ours = CAPABILITIES + ((DELAY,) if isinstance(handler, DelayingHandler) else ())
    try:
        delay = DELAY in handshake(stdin, stdout, ours)
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
            _handle(handler, request, stdin, stdout, log, delay)
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
    for fd in (0, 1):
        widen_pipe(fd)
    stdin = open(0, "rb", buffering=IO_BUFFER, closefd=False)  # noqa: SIM115
    stdout = open(1, "wb", buffering=IO_BUFFER, closefd=False)  # noqa: SIM115
    try:
        return serve(handler, stdin, stdout, log)
    finally:
        with contextlib.suppress(BrokenPipeError):
            stdout.flush()


def widen_pipe(fd: int, size: int = PIPE_BYTES) -> int:
    """Ask for a pipe buffer of ``size`` bytes on ``fd`` (Linux ``F_SETPIPE_SZ``), so that git
    and the filter hand each other a megabyte per wake-up instead of 64 KiB: fewer context
    switches, which count on a busy machine. Returns the capacity the pipe has now, 0 when
    ``fd`` is no pipe or the system has no such call; a refusal (``pipe-max-size``, the
    per-user limit) leaves the pipe as it was."""
    try:
        import fcntl
    except ImportError:  # not on this system (Windows)
        return 0
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    get_size = getattr(fcntl, "F_GETPIPE_SZ", None)
    if set_size is None or get_size is None:
        return 0
    try:
        return int(fcntl.fcntl(fd, set_size, size))
    except OSError:
        pass
    try:
        return int(fcntl.fcntl(fd, get_size))
    except OSError:
        return 0
