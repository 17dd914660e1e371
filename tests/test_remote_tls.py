"""The LFS remote's HTTP client makes its TLS context on the first ``https`` request (a
plain-HTTP remote never loads the CA certificates), and that context still verifies: a
loopback HTTPS server is trusted through ``SSL_CERT_FILE`` and refused without it."""

from __future__ import annotations

import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from potluck.remote import RemoteOptions
from potluck.remote.lfs import make_client


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(https URL, its self-signed certificate) of a loopback server."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/", cert
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.mark.usefixtures("no_proxies")
def test_https_is_verified_with_the_lazily_made_context(
    tls_server: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, cert = tls_server
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    with make_client(RemoteOptions()) as client:
        assert client.get(url).text == "hello"
    monkeypatch.delenv("SSL_CERT_FILE")
    with make_client(RemoteOptions()) as client, pytest.raises(httpx.ConnectError) as e:
        client.get(url)
    assert "CERTIFICATE_VERIFY_FAILED" in str(e.value)


@pytest.mark.usefixtures("no_proxies")
def test_plain_http_never_makes_the_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[object] = []
    real = ssl.create_default_context

    def counting(*args: object, **kwargs: object) -> ssl.SSLContext:
        made.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ssl, "create_default_context", counting)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with make_client(RemoteOptions()) as client:
            assert client.get(f"http://127.0.0.1:{server.server_address[1]}/").text == "hello"
    finally:
        server.shutdown()
        server.server_close()
    assert made == []


def test_the_remote_layer_leaves_httpx_command_line_tool_out() -> None:
    """httpx's CLI (rich, pygments, click) is never imported by a process that talks to a
    remote, and the client still works; an httpx imported before potluck is left alone."""
    code = (
        "import sys\n"
        "from potluck.remote.lfs import LfsRemote\n"
        "import httpx\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'rich', 'pygments', 'click'}))\n"
        "print(sys.modules['httpx._main'], httpx.Client is not None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "None True"]
    first = "import httpx._main, sys\nimport potluck.remote.lfs\nprint(sys.modules['httpx._main'])"
    out = subprocess.run([sys.executable, "-c", first], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("<module 'httpx._main'")
