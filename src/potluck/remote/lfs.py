"""Git LFS remote: the Batch API (``POST <url>/objects/batch``) plus ``basic`` transfers.

The URL is the LFS endpoint, e.g. ``https://host/org/repo.git/info/lfs``. A 401 from the
batch endpoint asks the ``Credentials`` (git's credential helpers) for a username/password and
retries with HTTP Basic; the same credentials go to action URLs on the same origin that bring
no ``Authorization`` header of their own.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from potluck.errors import (
    IntegrityError,
    MissingObjectError,
    PotluckError,
    RemoteError,
    UserError,
)
from potluck.remote.base import (
    Credentials,
    ObjectRef,
    OnBytes,
    Opener,
    RemoteOptions,
    Sink,
    TransferStats,
    unique_refs,
)
from potluck.remote.transfer import (
    DAMAGED_HINT,
    Body,
    Engine,
    Meter,
    RetryableError,
    error_message,
    missing_error,
    raise_if_retryable,
    read_exact,
    safe_url,
    transport_error,
)

LFS_JSON = "application/vnd.git-lfs+json"
GONE = (404, 410)
#: redirects followed for one object download (git-lfs follows up to 3; storage fronts chain
#: a couple at most); more is a loop
MAX_REDIRECTS = 10
EXPIRY_MARGIN = 5.0
AUTH_HINT = (
    "check the username and password (or token) for this host; git asks its credential "
    "helpers (`git config credential.helper`): fix or clear the stored entry, then retry"
)
NO_CREDENTIALS_HINT = (
    "store credentials for this host with a git credential helper "
    "(`git config credential.helper store`, then log in once), or put a token in the URL"
)


@dataclass(frozen=True)
class Action:
    """One batch action: where to send the request, its headers, when it goes stale."""

    href: str
    header: dict[str, str]
    deadline: float | None = None  # on the time.monotonic() clock


@dataclass
class Entry:
    """One object of a batch response: its actions, or the server's ``(code, message)``."""

    actions: dict[str, Action] = field(default_factory=dict)
    error: tuple[int, str] | None = None


class LfsRemote:
    """``ObjectRemote`` speaking the Git LFS Batch API with the ``basic`` transfer adapter."""

    def __init__(
        self, url: str, options: RemoteOptions, credentials: Credentials | None = None
    ) -> None:
        parsed = httpx.URL(url)
        self._auth: tuple[str, str] | None = None
        if parsed.username:  # credentials in the URL: use them, never show them
            self._auth = (parsed.username, parsed.password or "")
            parsed = parsed.copy_with(username=None, password=None)
        self.url = str(parsed).rstrip("/")
        self._origin = _origin(parsed)
        self._credentials = credentials
        self._auth_lock = threading.Lock()
        self._approved = False
        self.options = options
        self._client = make_client(options)
        self._engine = Engine(options, self.url)
        self._planned: dict[str, Entry] = {}  # upload actions from plan_upload, by oid
        self._plan_lock = threading.Lock()

    def close(self) -> None:
        """Stop workers and close pooled connections."""
        self._engine.close()
        self._client.close()

    def missing(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """Refs the server lacks, asked with ``download`` batches (404/410, or 422: bad size)."""
        entries = self._batch("download", unique_refs(refs))
        absent = set()
        for oid, entry in entries.items():
            if entry.error is not None:
                if entry.error[0] not in (*GONE, 422):
                    raise self._object_error(oid, entry.error)
                absent.add(oid)
        return [r for r in refs if r.oid in absent]

    def plan_upload(self, refs: Sequence[ObjectRef]) -> list[ObjectRef]:
        """Refs the server lacks, asked with ``upload`` batches (an object of another size is
        lacking too); the answers are kept for ``upload`` (what to PUT, what is there), so a
        push asks one batch per ``batch_size`` objects. A server that refuses the upload
        batch (HTTP 403: read-only access) is asked with download batches instead, and the
        push fails only if something must really be uploaded."""
        todo = unique_refs(refs)
        try:
            entries = self._checked_batch("upload", todo)
        except UserError as e:
            if e.data.get("status") != 403:
                raise
            return self.missing(refs)
        with self._plan_lock:  # an answer without an upload action: there already, no PUT
            self._planned.update(entries)
        return [r for r in refs if "upload" in entries[r.oid].actions]

    def upload(
        self, refs: Sequence[ObjectRef], open_object: Opener, on_bytes: OnBytes | None = None
    ) -> TransferStats:
        """PUT every object the server asks for, then run its ``verify`` action (the server's
        answer from ``plan_upload`` is used where there is one: no second batch)."""
        todo = unique_refs(refs)
        with self._plan_lock:
            entries = {r.oid: e for r in todo if (e := self._planned.pop(r.oid, None))}
        entries.update(self._checked_batch("upload", [r for r in todo if r.oid not in entries]))
        wanted = [r for r in todo if "upload" in entries[r.oid].actions]
        meter = Meter(on_bytes)
        meter.skipped(len(todo) - len(wanted))
        self._engine.map(lambda r: self._upload_one(r, entries[r.oid], open_object, meter), wanted)
        return meter.stats

    def download(
        self,
        refs: Sequence[ObjectRef],
        sink: Sink,
        tmp_dir: Path,
        on_bytes: OnBytes | None = None,
        *,
        sink_checks: Collection[str] = (),
    ) -> TransferStats:
        """Fetch, verify and sink every ref; absent objects are reported before any transfer
        (``sink_checks``: see ``ObjectRemote.download``)."""
        todo = unique_refs(refs)
        entries = self._batch("download", todo)
        absent = [r.oid for r in todo if (e := entries[r.oid].error) and e[0] in GONE]
        if absent:
            raise missing_error(absent, self.url)
        for ref in todo:
            entry = entries[ref.oid]
            if entry.error is not None or "download" not in entry.actions:
                raise self._object_error(ref.oid, entry.error or (0, "no download action"))
        tmp_dir.mkdir(parents=True, exist_ok=True)
        meter = Meter(on_bytes)

        def one(ref: ObjectRef) -> None:
            box = [entries[ref.oid].actions["download"]]

            def open_body(offset: int) -> AbstractContextManager[Body]:
                return self._get(ref, box, offset)

            hashed = ref.oid not in sink_checks
            self._engine.download(ref, tmp_dir, open_body, sink, meter, hashed=hashed)

        self._engine.map(one, todo)
        return meter.stats

    # -- batch API and authentication --------------------------------------------------------

    def _checked_batch(self, operation: str, refs: list[ObjectRef]) -> dict[str, Entry]:
        """``_batch``, raising the first per-object error."""
        entries = self._batch(operation, refs)
        for oid, entry in entries.items():
            if entry.error is not None:
                raise self._object_error(oid, entry.error)
        return entries

    def _batch(self, operation: str, refs: list[ObjectRef]) -> dict[str, Entry]:
        """Batch ``refs`` in chunks of ``batch_size``; the first alone (it settles auth)."""
        size = self.options.batch_size
        chunks = [refs[i : i + size] for i in range(0, len(refs), size)]
        merged: dict[str, Entry] = {}
        if chunks:
            merged.update(self._batch_chunk(operation, chunks[0]))
        for part in self._engine.map(lambda c: self._batch_chunk(operation, c), chunks[1:]):
            merged.update(part)
        return merged

    def _batch_chunk(self, operation: str, refs: list[ObjectRef]) -> dict[str, Entry]:
        payload = {
            "operation": operation,
            "transfers": ["basic"],
            "objects": [{"oid": r.oid, "size": r.size} for r in refs],
            "hash_algo": "sha256",
        }
        used = self._auth
        resp = self._send_batch(payload, used)
        if resp.status_code == 401:
            resp = self._login(payload, used)
        status = resp.status_code
        if status == 200:
            return parse_batch(resp, refs, self.url)
        if operation == "download" and status == 404:  # giftless: every object is missing
            return {r.oid: Entry(error=(404, "object does not exist")) for r in refs}
        if operation == "download" and status == 422:  # giftless: every object has an error
            if len(refs) == 1:
                return {refs[0].oid: Entry(error=(422, error_message(resp)))}
            merged: dict[str, Entry] = {}
            for ref in refs:  # ask one by one to learn each object's error
                merged.update(self._batch_chunk(operation, [ref]))
            return merged
        raise http_error(resp, f"LFS batch request ({operation})", self.url)

    def _send_batch(self, payload: dict[str, Any], auth: tuple[str, str] | None) -> httpx.Response:
        body = json.dumps(payload).encode()
        headers = {"Accept": LFS_JSON, "Content-Type": LFS_JSON}
        url = f"{self.url}/objects/batch"
        return self._engine.retry(
            lambda: self._request("POST", url, content=body, headers=headers, auth=_basic(auth)),
            f"LFS batch request to {url}",
        )

    def _login(self, payload: dict[str, Any], used: tuple[str, str] | None) -> httpx.Response:
        """Answer a 401: fill credentials, retry once, then approve or reject them."""
        with self._auth_lock:
            if self._auth is not None and self._auth != used:
                creds = self._auth  # another worker logged in meanwhile
            else:
                filled = self._credentials.fill(self.url) if self._credentials else None
                if filled is None:
                    raise UserError(
                        f"{self.url} requires authentication (HTTP 401); no credentials found",
                        hint=NO_CREDENTIALS_HINT,
                        url=self.url,
                        status=401,
                    )
                creds = filled
            resp = self._send_batch(payload, creds)
            if resp.status_code == 401:
                if self._credentials is not None:
                    self._credentials.reject(self.url, *creds)
                raise UserError(
                    f"authentication failed for {self.url} (HTTP 401 for user {creds[0]!r})",
                    hint=AUTH_HINT,
                    url=self.url,
                    status=401,
                )
            if resp.status_code != 403 and not self._approved and self._credentials is not None:
                self._credentials.approve(self.url, *creds)
                self._approved = True
            self._auth = creds
            return resp

    def _refresh(self, ref: ObjectRef, operation: str, action: Action) -> Action | None:
        """``action`` while valid, else a fresh one from a new batch (``None``: not needed)."""
        if action.deadline is None or time.monotonic() < action.deadline - EXPIRY_MARGIN:
            return action
        entry = self._batch_chunk(operation, [ref])[ref.oid]
        if entry.error is not None:
            raise self._object_error(ref.oid, entry.error)
        return entry.actions.get(operation)

    # -- object transfers --------------------------------------------------------------------

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request; transport failures, 429 and 5xx become ``RetryableError``."""
        try:
            resp = self._client.request(method, url, **kwargs)
        except httpx.TransportError as e:
            raise transport_error(e, url) from e
        except httpx.RequestError as e:
            raise request_error(e, url, self.url) from None
        raise_if_retryable(resp, url)
        return resp

    def _action_auth(self, action: Action) -> httpx.BasicAuth | None:
        """Basic auth for same-origin action URLs that carry no Authorization of their own."""
        if any(k.lower() == "authorization" for k in action.header):
            return None
        if _origin(httpx.URL(action.href)) != self._origin:
            return None
        return _basic(self._auth)

    @contextmanager
    def _get(self, ref: ObjectRef, box: list[Action], offset: int) -> Iterator[Body]:
        action = self._refresh(ref, "download", box[0])
        if action is None:
            raise self._object_error(ref.oid, (0, "the server no longer offers a download"))
        box[0] = action
        headers = {"Accept-Encoding": "identity", **action.header}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        auth = self._action_auth(action)
        try:
            with self._client.stream(
                "GET", action.href, headers=headers, auth=auth, follow_redirects=True
            ) as resp:
                yield self._body_start(resp, ref, offset), resp.iter_bytes()
        except httpx.TransportError as e:
            raise transport_error(e, action.href) from e
        except httpx.RequestError as e:
            raise request_error(e, action.href, self.url) from None

    def _body_start(self, resp: httpx.Response, ref: ObjectRef, offset: int) -> int:
        """Where the response body starts in the object; raises unless 200 or 206."""
        status = resp.status_code
        if status in (200, 206):
            start = _range_start(resp) if status == 206 else 0
            if start != offset and status == 206:  # start over, without a range
                raise RetryableError(f"asked for bytes {offset}-, got {start}-", integrity=True)
            length = resp.headers.get("Content-Length", "")
            encoded = resp.headers.get("Content-Encoding", "identity") != "identity"
            if length.isdigit() and not encoded and int(length) != ref.size - start:
                message = f"the server sends {int(length) + start} bytes, not {ref.size}"
                raise RetryableError(message, integrity=True)
            return start
        resp.read()
        raise_if_retryable(resp, resp.url)
        if status == 416:
            raise RetryableError("the server refused the byte range", integrity=True)
        if status in GONE:
            raise MissingObjectError(
                f"object {ref.oid} vanished from {self.url} (HTTP {status} from its URL)",
                hint="someone removed it from the remote; push it from a clone that has it",
                oids=[ref.oid],
                url=self.url,
            )
        raise http_error(resp, f"download of object {ref.oid}", self.url)

    def _upload_one(self, ref: ObjectRef, entry: Entry, open_object: Opener, meter: Meter) -> None:
        what = f"object {ref.oid} on {self.url}"
        if not self._engine.retry(
            lambda: self._put(ref, entry.actions["upload"], open_object, meter), f"upload of {what}"
        ):
            meter.skipped(1)
            return
        verify = entry.actions.get("verify")
        if verify is not None:
            self._engine.retry(lambda: self._verify(ref, verify), f"verify of {what}")
        meter.done()

    def _put(self, ref: ObjectRef, action: Action, open_object: Opener, meter: Meter) -> bool:
        fresh = self._refresh(ref, "upload", action)
        if fresh is None:
            return False  # the object arrived meanwhile
        headers = {
            **fresh.header,
            "Content-Length": str(ref.size),
            "Content-Type": "application/octet-stream",
        }

        def body(stream: Any) -> Iterator[bytes]:
            for piece in read_exact(stream, ref):
                meter.moved(len(piece))
                yield piece

        with open_object(ref) as stream:
            auth = self._action_auth(fresh)
            resp = self._request(
                "PUT", fresh.href, content=body(stream), headers=headers, auth=auth
            )
        if resp.status_code >= 300:
            raise http_error(resp, f"upload of object {ref.oid}", self.url)
        return True

    def _verify(self, ref: ObjectRef, action: Action) -> None:
        headers = {"Accept": LFS_JSON, "Content-Type": LFS_JSON, **action.header}
        body = json.dumps({"oid": ref.oid, "size": ref.size}).encode()
        auth = self._action_auth(action)
        resp = self._request("POST", action.href, content=body, headers=headers, auth=auth)
        if resp.status_code in (*GONE, 422):
            raise PotluckError(
                f"{self.url} does not have object {ref.oid} after uploading it "
                f"(verify: HTTP {resp.status_code}: {error_message(resp)})",
                hint="push again; if this repeats, the server is losing uploads",
                oid=ref.oid,
                url=self.url,
                status=resp.status_code,
            )
        if resp.status_code >= 300:
            raise http_error(resp, f"verify of object {ref.oid}", self.url)

    def _object_error(self, oid: str, error: tuple[int, str]) -> PotluckError:
        """The error for a per-object batch error (422: the server's copy has another size)."""
        code, message = error
        if code == 422:
            return IntegrityError(
                f"object {oid} on {self.url} is damaged: {message} (error 422)",
                hint=DAMAGED_HINT,
                oid=oid,
                url=self.url,
                status=code,
            )
        cls = UserError if code in (401, 403) else PotluckError
        return cls(
            f"{self.url} refused object {oid}: {message} (error {code})",
            hint="check your access to this repository, or report the server's answer",
            oid=oid,
            url=self.url,
            status=code,
        )


def make_client(options: RemoteOptions) -> httpx.Client:
    """The HTTP client of one remote: ``workers + 2`` pooled connections. Without proxies in
    the environment, the TLS context (loading the system's CA certificates: ~0.03-0.3 s) is
    made when the first ``https`` request needs it, so a plain-HTTP remote never pays it."""
    n = options.workers + 2
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    common: dict[str, Any] = {
        "timeout": httpx.Timeout(options.timeout),
        "limits": limits,
        "max_redirects": MAX_REDIRECTS,
    }
    if urllib.request.getproxies():  # httpx mounts proxy transports: leave them as they are
        return httpx.Client(**common)
    plain = httpx.HTTPTransport(verify=False, limits=limits)  # only ever sees http:// URLs
    tls = _OnFirstUse(lambda: httpx.HTTPTransport(limits=limits))
    return httpx.Client(**common, transport=plain, mounts={"https://": tls})


class _OnFirstUse(httpx.BaseTransport):
    """A transport made by ``make`` when the first request comes."""

    def __init__(self, make: Callable[[], httpx.BaseTransport]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._transport: httpx.BaseTransport | None = None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            if self._transport is None:
                self._transport = self._make()
            transport = self._transport
        return transport.handle_request(request)

    def close(self) -> None:
        with self._lock:
            if self._transport is not None:
                self._transport.close()


def request_error(e: httpx.RequestError, href: str, url: str) -> RemoteError:
    """A request that cannot succeed by trying again: a redirect loop, a body that does not
    decode. Names the URL asked for (no credentials, no query)."""
    if isinstance(e, httpx.TooManyRedirects):
        return RemoteError(
            f"{safe_url(href)} redirects more than {MAX_REDIRECTS} times (a redirect loop?)",
            hint="the LFS server or the storage behind it is misconfigured; report it to the "
            "host of this remote, or point potluck at another one (`potluck remote set-url`)",
            url=url,
        )
    return RemoteError(
        f"request to {safe_url(href)} failed: {type(e).__name__}: {e}",
        hint="the server answered something potluck cannot read; retry later or report it",
        url=url,
    )


def http_error(resp: httpx.Response, what: str, url: str) -> PotluckError:
    """A clear error for an unexpected HTTP answer: what failed, the status, what to do."""
    status = resp.status_code
    text = f"{what} at {safe_url(resp.url)} failed: HTTP {status}: {error_message(resp)}"
    if status in (401, 403):
        return UserError(text, hint=AUTH_HINT, url=url, status=status)
    if 400 <= status < 500:
        hint = "check the remote URL: an LFS endpoint usually ends in <repo>.git/info/lfs"
        return UserError(text, hint=hint, url=url, status=status)
    return PotluckError(text, hint="the server answered oddly; retry later", url=url, status=status)


def parse_batch(resp: httpx.Response, refs: Sequence[ObjectRef], url: str) -> dict[str, Entry]:
    """The per-object entries of a 200 batch response, checked to cover every ref."""
    try:
        body = resp.json()
        entries = {str(o["oid"]): _entry(o) for o in body["objects"] or []}
        transfer, algo = body.get("transfer") or "basic", body.get("hash_algo") or "sha256"
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError, ArithmeticError):
        raise PotluckError(
            f"{url} answered the batch request with something that is not LFS batch JSON",
            hint="check that the URL is a Git LFS endpoint (usually <repo>.git/info/lfs)",
            url=url,
        ) from None
    absent = [r.oid for r in refs if r.oid not in entries]
    if transfer != "basic" or algo != "sha256" or absent:
        raise PotluckError(
            f"{url} sent an unusable batch response (transfer {transfer!r}, hash {algo!r}, "
            f"{len(absent)} object(s) left out)",
            hint="the server must support the 'basic' transfer and sha256 object ids",
            url=url,
        )
    return {r.oid: entries[r.oid] for r in refs}


def _entry(obj: dict[str, Any]) -> Entry:
    error = obj.get("error")
    if error:
        return Entry(error=(int(error.get("code", 0)), str(error.get("message", ""))))
    actions = {}
    for name, raw in (obj.get("actions") or {}).items():
        header = {str(k): str(v) for k, v in (raw.get("header") or {}).items()}
        actions[str(name)] = Action(str(raw["href"]), header, _deadline(raw))
    return Entry(actions)


def _deadline(raw: dict[str, Any]) -> float | None:
    """When an action expires, on the ``time.monotonic`` clock (``expires_in`` wins)."""
    expires_in = raw.get("expires_in")
    if isinstance(expires_in, (int, float)) and expires_in > 0:
        return time.monotonic() + expires_in
    expires_at = raw.get("expires_at")
    try:
        when = datetime.fromisoformat(str(expires_at).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
    if when < 946684800:  # before 2000: Go's zero time, meaning "never"
        return None
    return time.monotonic() + (when - time.time())


def _origin(url: httpx.URL) -> tuple[str, str, int | None]:
    return url.scheme, url.host, url.port or {"http": 80, "https": 443}.get(url.scheme)


def _basic(auth: tuple[str, str] | None) -> httpx.BasicAuth | None:
    return httpx.BasicAuth(*auth) if auth is not None else None


def _range_start(resp: httpx.Response) -> int:
    unit, _, rest = resp.headers.get("Content-Range", "").partition(" ")
    start = rest.split("-", 1)[0]
    return int(start) if unit == "bytes" and start.isdigit() else -1
