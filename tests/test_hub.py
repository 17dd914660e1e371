"""potluck hub: the index (SQLite and a real PostgreSQL), the pages and their JSON twins served
by uvicorn on loopback, security (paths, escaping, no stack traces) and Chromium's DOM.

One module-scoped repository, built by the demo's communal story with real git and potluck
(base v1, branches alice and bob, merges, evaluation records, a passing and a failing gate, the
alias ``stable``), plus a branch ``evil`` whose model has a tensor named with HTML and a symlink
pointing out of the repository.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from potluck.cli.main import cli
from potluck.demo.communal_story import communal_story
from potluck.demo.model import save_safetensors
from potluck.demo.shell import Shell
from potluck.git.repo import Repo
from potluck.hub import index as ix
from potluck.hub.pages import Hub, hub_for
from potluck.ops.vcs import load_tensors
from testsupport.servers import PostgresServer

EVIL = '<script>alert("x")</script>&.weight'
BIN = str(Path(sys.executable).parent)
CHROMIUM = "/usr/bin/chromium"


def _build(root: Path) -> Path:
    """The communal story's repository plus the ``evil`` branch."""
    repo = root / "communal"
    communal_story(repo, lambda _line: None)
    sh = Shell(repo, lambda _line: None)
    sh("git", "switch", "-q", "-c", "evil", "main")
    m = Repo(repo).manifest_at("main", "model.safetensors")
    assert m is not None
    params = load_tensors(m, Repo(repo).odb)
    params[EVIL] = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_safetensors(params, repo / "model.safetensors")
    os.symlink("/etc", repo / "escape")
    sh("git", "add", "model.safetensors", "escape")
    sh("git", "commit", "-q", "-m", "evil: <b>bold</b> names")
    sh("git", "switch", "-q", "main")
    return repo


@pytest.fixture(scope="module")
def hubrepo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The fixture repository (built once per module) with a fixed git identity."""
    root = tmp_path_factory.mktemp("hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
        yield _build(root)


@pytest.fixture(scope="module")
def sqlite_hub(hubrepo: Path, tmp_path_factory: pytest.TempPathFactory) -> Hub:
    """The repository indexed into a SQLite file."""
    db = tmp_path_factory.mktemp("db") / "hub.sqlite"
    h = hub_for([str(hubrepo)], f"sqlite:///{db}")
    assert h.reindex() == {"communal": 7}
    return h


@contextmanager
def serving(h: Hub) -> Iterator[str]:
    """uvicorn serving ``h`` on 127.0.0.1:<free port>, in a thread; yields the base URL."""
    import uvicorn

    from potluck.hub.app import make_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(make_app(h), host="127.0.0.1", port=port, log_level="critical")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(sqlite_hub: Hub) -> Iterator[str]:
    """The SQLite hub served by uvicorn."""
    with serving(sqlite_hub) as url:
        yield url


def get(url: str) -> tuple[int, str, dict[str, str]]:
    """Status, body and headers of a GET (errors included)."""
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(), {k.lower(): v for k, v in e.headers.items()}


def api(server: str, path: str) -> Any:
    status, body, _ = get(server + "/api" + path)
    assert status == 200, body
    return json.loads(body)


def sha(repo: Path, rev: str) -> str:
    return subprocess.run(
        ["git", "rev-parse", rev], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


# -- the index, on SQLite and on a real PostgreSQL ---------------------------------------------


def facts(h: Hub) -> dict[str, Any]:
    """What the index says, in a form independent of the database."""
    with h.engine.connect() as c:
        commits = {
            r["subject"]: (r["added"], r["removed"], r["changed"])
            for r in ix.rows(c, sa.select(ix.COMMITS))
        }
        refs = sorted((r["kind"], r["name"]) for r in ix.rows(c, sa.select(ix.REFS)))
        evals = sorted(
            (r["kind"], r["task"], r["verdict"], round(r["value"], 4))
            for r in ix.rows(c, sa.select(ix.EVALS))
        )
        bob = ix.rows(
            c,
            sa.select(ix.CHANGES.c.name, ix.CHANGES.c.status, ix.CHANGES.c.rel)
            .join(ix.COMMITS, ix.COMMITS.c.sha == ix.CHANGES.c.head)
            .where(ix.COMMITS.c.subject == "bob: retrain layer 1 attention")
            .order_by(ix.CHANGES.c.name),
        )
    return {
        "commits": commits,
        "refs": refs,
        "evals": evals,
        "bob": [(r["name"], r["status"], round(r["rel"], 2)) for r in bob],
    }


EXPECTED_COMMITS = {
    "track checkpoints with potluck": (0, 0, 0),
    "v1: community base model and its evaluation suite": (20, 0, 0),
    "alice: fine-tune layer 0's MLP (small step)": (0, 0, 2),
    "bob: retrain layer 1 attention": (0, 0, 2),
    "merge alice": (0, 0, 2),
    "merge bob": (0, 0, 2),
    "evil: <b>bold</b> names": (1, 0, 0),
}
LAYERS = ["h.0", "h.1", "ln_f.bias", "ln_f.weight", "wpe", "wte"]
EXPECTED_REFS = [
    ("alias", "stable"),
    ("branch", "alice"),
    ("branch", "bob"),
    ("branch", "evil"),
    ("branch", "main"),
    ("branch", "merge-bob"),
    ("head", "HEAD"),
    ("tag", "v1"),
]


def test_index_sqlite(sqlite_hub: Hub) -> None:
    f = facts(sqlite_hub)
    assert f["commits"] == EXPECTED_COMMITS
    assert f["refs"] == EXPECTED_REFS
    assert f["bob"] == [
        ("h.1.attn.proj.weight", "changed", 1.41),
        ("h.1.attn.qkv.weight", "changed", 1.41),
    ]
    assert [e[:3] for e in f["evals"]] == [
        ("gate", "agree", "fail"),
        ("gate", "agree", "pass"),
        ("score", "agree", None),
        ("score", "agree", None),
        ("score", "agree", None),
        ("score", "agree", None),
    ]


def test_index_postgres_matches_sqlite(hubrepo: Path, sqlite_hub: Hub) -> None:
    why = PostgresServer.unavailable()
    if why:
        pytest.skip(why)
    with PostgresServer() as pg:
        h = hub_for([str(hubrepo)], pg.url)
        assert h.reindex() == {"communal": 7}
        assert h.reindex() == {"communal": 0}  # incremental: nothing new
        assert facts(h) == facts(sqlite_hub)
        assert h.reindex(full=True) == {"communal": 7}
        assert facts(h) == facts(sqlite_hub)
        h.engine.dispose()


def test_reindex_cli(hubrepo: Path, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'i.sqlite'}"
    r = CliRunner().invoke(cli, ["hub", "reindex", str(hubrepo), "--db", db])
    assert (r.exit_code, r.output) == (0, "communal: 7 commit(s) indexed\n")
    r = CliRunner().invoke(cli, ["hub", "reindex", str(tmp_path / "nope"), "--db", db])
    assert (r.exit_code, r.output.splitlines()[0]) == (
        2,
        f"potluck: error: {tmp_path / 'nope'}: no such directory",
    )
    r = CliRunner().invoke(cli, ["hub", "reindex", str(hubrepo), "--db", "mysql+nope://x"])
    assert r.exit_code == 2
    assert "not a database URL: 'mysql+nope://x'" in r.output
    assert "Traceback" not in r.output
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = CliRunner().invoke(
        cli, ["hub", "reindex", str(hubrepo), "--db", f"postgresql://hub@127.0.0.1:{port}/x"]
    )
    assert r.exit_code == 2
    assert r.output.startswith(f"potluck: error: cannot open the hub index at 127.0.0.1:{port}/x: ")
    assert "Traceback" not in r.output


# -- pages and their JSON twins -------------------------------------------------------------


def test_overview_and_commits(server: str, hubrepo: Path) -> None:
    o = api(server, "/r/communal/")
    assert [b["name"] for b in o["branches"]] == ["alice", "bob", "evil", "main", "merge-bob"]
    assert o["aliases"] == [{"name": "stable", "sha": sha(hubrepo, "main")}]
    assert o["tags"] == [{"name": "v1", "sha": sha(hubrepo, "v1")}]
    assert (o["commits"], o["head"]) == (7, sha(hubrepo, "main"))
    assert {e["task"] for e in o["latest_evals"]} == {"agree"}
    c = api(server, "/r/communal/commits")
    assert {
        r["subject"]: (r["added"], r["removed"], r["changed"]) for r in c["commits"]
    } == EXPECTED_COMMITS
    c2 = api(server, "/r/communal/commits?limit=2&offset=1")
    assert [r["sha"] for r in c2["commits"]] == [r["sha"] for r in c["commits"][1:3]]


def test_commit_page_and_heatmap(server: str, hubrepo: Path) -> None:
    d = api(server, "/r/communal/commit/bob")
    assert d["commit"]["sha"] == sha(hubrepo, "bob")
    assert d["commit"]["parents"] == [sha(hubrepo, "v1")]
    assert d["paths"] == ["model.safetensors"]
    assert d["unchanged"] == 18
    assert sorted((c["name"], c["status"]) for c in d["changes"]) == [
        ("h.1.attn.proj.weight", "changed"),
        ("h.1.attn.qkv.weight", "changed"),
    ]
    shape = svg_shape(d["heatmap"])
    assert (shape["svg.heatmap"], shape["rect.cell"], shape["text.layer"]) == (1, 20, 6)
    assert shape["layers"] == LAYERS
    assert [n for n, st in shape["cells"] if st != "unchanged"] == [
        "h.1.attn.proj.weight",
        "h.1.attn.qkv.weight",
    ]
    assert [n for n, _ in shape["cells"]][:3] == [
        "h.0.attn.proj.weight",
        "h.0.attn.qkv.weight",
        "h.0.ln_1.bias",
    ]


def test_diff_between_any_two_revisions(server: str) -> None:
    d = api(server, "/r/communal/diff?a=v1&b=merge-bob")  # not a parent/child pair
    names = sorted(c["name"] for c in d["changes"])
    assert names == [
        "h.0.mlp.fc.weight",
        "h.0.mlp.proj.weight",
        "h.1.attn.proj.weight",
        "h.1.attn.qkv.weight",
    ]
    shape = svg_shape(d["heatmap"])
    assert shape["layers"] == LAYERS
    assert sorted(n for n, st in shape["cells"] if st != "unchanged") == names
    again = api(server, "/r/communal/diff?a=v1&b=merge-bob")  # now from the index
    assert again == d


def test_tensor_page(server: str, hubrepo: Path) -> None:
    t = api(server, "/r/communal/tensor?rev=bob&path=model.safetensors&name=h.1.attn.qkv.weight")
    m = Repo(hubrepo).manifest_at("bob", "model.safetensors")
    assert m is not None
    e = m.tensors()["h.1.attn.qkv.weight"]
    assert (t["dtype"], t["shape"], t["sha256"]) == ("F32", list(e.shape), e.oid)
    assert sum(t["values"]["counts"]) == int(np.prod(e.shape))
    assert sum(t["delta"]["counts"]) == int(np.prod(e.shape))
    assert t["delta_base"] == sha(hubrepo, "v1")
    assert [(h["subject"], h["status"]) for h in t["history"]] == [
        ("merge bob", "changed"),
        ("bob: retrain layer 1 attention", "changed"),
        ("v1: community base model and its evaluation suite", "added"),
    ]
    assert svg_shape(t["values_svg"])["rect.bar"] == 40
    same = api(server, "/r/communal/tensor?rev=bob&path=model.safetensors&name=h.0.ln_1.bias")
    assert (same["delta"], same["delta_unchanged"], same["delta_base"]) == (
        None,
        True,
        sha(hubrepo, "v1"),
    )


def test_lineage_and_evals(server: str, hubrepo: Path) -> None:
    assert api(server, "/r/communal/lineage")["commit"] == sha(hubrepo, "main")  # rev=HEAD
    lin = api(server, "/r/communal/lineage?rev=merge-bob")
    assert [e["relation"] for e in lin["edges"]] == ["merge", "finetune", "finetune"]
    shape = svg_shape(lin["svg"])
    assert (shape["g.node"], shape["line.edge"]) == (4, 4)
    ev = api(server, "/r/communal/evals")
    assert sorted(ev["tasks"]) == ["agree"]
    assert sorted(g["verdict"] for g in ev["gates"]) == ["fail", "pass"]
    bad = next(g for g in ev["gates"] if g["verdict"] == "fail")
    assert (bad["commit"], bad["base_commit"]) == (sha(hubrepo, "merge-bob"), sha(hubrepo, "main"))
    assert svg_shape(ev["charts"]["agree"])["circle.point"] == len(ev["tasks"]["agree"])


# -- security ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/r/communal/tensor?rev=main&path=../../etc/passwd&name=x",
        "/r/communal/tensor?rev=main&path=/etc/passwd&name=x",
        "/r/communal/tensor?rev=evil&path=escape/passwd&name=x",
        "/r/communal/tensor?rev=evil&path=escape&name=x",
        "/r/communal/tensor?rev=--output=/tmp/x&path=model.safetensors&name=x",
        "/r/communal/commit/..%2F..%2Fetc%2Fpasswd",
        "/r/..%2F..%2Fetc/",
        "/static/..%2F..%2Fpyproject.toml",
        "/r/communal/tensor?rev=main&path=model.safetensors&name=nope",
    ],
)
def test_paths_from_urls_never_reach_the_file_system(server: str, path: str) -> None:
    for prefix in ("", "/api"):
        status, body, _ = get(server + prefix + path)
        assert status == 404, body
        assert "Traceback" not in body and "root:" not in body and "[project]" not in body
        if prefix:
            assert set(json.loads(body)) == {"error", "hint"}


def test_bad_query_is_400_without_trace(server: str) -> None:
    status, body, _ = get(server + "/api/r/communal/commits?limit=-1")
    assert (status, json.loads(body)["error"]) == (400, "limit must be a whole number, not '-1'")
    status, body, _ = get(server + "/api/r/communal/diff?a=v1")
    assert (status, json.loads(body)["error"]) == (400, "missing query parameter 'b'")


def test_read_only(server: str) -> None:
    req = urllib.request.Request(server + "/r/communal/", method="POST", data=b"x")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 405


def test_user_data_is_escaped(server: str) -> None:
    status, body, headers = get(server + "/r/communal/commit/evil")
    assert status == 200
    assert "<script>" not in body and "<b>bold</b>" not in body
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&amp;.weight" in body
    assert "&lt;b&gt;bold&lt;/b&gt;" in body
    assert headers["content-security-policy"].startswith("default-src 'none'")
    status, body, _ = get(server + "/r/communal/commits")
    assert "<b>bold</b>" not in body


def test_internal_error_has_no_stack_trace(hubrepo: Path, tmp_path: Path) -> None:
    """A repository whose object store is gone: the tensor page fails inside, says so briefly."""
    broken = tmp_path / "broken"
    shutil.copytree(hubrepo, broken, symlinks=True)
    h = hub_for([str(broken)], f"sqlite:///{tmp_path / 'b.sqlite'}")
    h.reindex()
    shutil.rmtree(broken / ".git" / "potluck" / "objects")
    page = "/r/broken/tensor?rev=bob&path=model.safetensors&name=h.1.attn.qkv.weight"
    with serving(h) as url:
        status, body, _ = get(url + page)
        assert status == 500
        assert "internal error" in body
        assert "Traceback" not in body and str(broken) not in body
        status, body, _ = get(url + "/api" + page)
        assert (status, json.loads(body)) == (
            500,
            {"error": "internal error", "hint": "the server's log has the details"},
        )


# -- SVG structure ----------------------------------------------------------------------------


class _Shape(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, Any] = {}
        self._text: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        for cls in (a.get("class") or "").split():
            key = f"{tag}.{cls}"
            self.counts[key] = self.counts.get(key, 0) + 1
            if key == "rect.cell":
                self.counts.setdefault("cells", []).append(
                    (a.get("data-name"), a.get("data-status"))
                )
            if key == "text.layer":
                self._text = key

    def handle_data(self, data: str) -> None:
        if self._text:
            self.counts.setdefault("layers", []).append(data)
            self._text = None


def svg_shape(svg: str) -> dict[str, Any]:
    """Element counts by tag.class, the heat map's cell names and layer labels."""
    p = _Shape()
    p.feed(svg)
    return p.counts


# -- a real browser -------------------------------------------------------------------------


def chromium(url: str, profile: Path, *args: str) -> subprocess.Popen[str]:
    """Headless Chromium on ``url`` with its own profile directory."""
    return subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            f"--user-data-dir={profile}",
            *args,
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed")
def test_chromium_renders_every_page(server: str, tmp_path: Path) -> None:
    pages = {
        "/r/communal/": ["table#branches", "table#aliases", "table#latest-evals"],
        "/r/communal/commits": ["table#commits"],
        "/r/communal/commit/bob": ["svg.heatmap", "table#changes"],
        "/r/communal/tensor?rev=bob&path=model.safetensors&name=h.1.attn.qkv.weight": [
            "svg.histogram"
        ],
        "/r/communal/lineage?rev=merge-bob": ["svg.lineage", "table#edges"],
        "/r/communal/evals": ["svg.evalchart", "table#gates"],
    }
    procs = {p: chromium(server + p, tmp_path / str(i), "--dump-dom") for i, p in enumerate(pages)}
    png = tmp_path / "commit.png"
    shot = chromium(
        server + "/r/communal/commit/bob",
        tmp_path / "shot",
        f"--screenshot={png}",
        "--window-size=800,600",
        "--hide-scrollbars",
    )
    shapes = {}
    for p, want in pages.items():
        dom, _ = procs[p].communicate(timeout=120)
        shape = shapes[p] = svg_shape(dom)
        ids = set(re.findall(r'<(\w+)[^>]* id="([^"]+)"', dom))
        for sel in want:
            tag, _, rest = sel.partition("#") if "#" in sel else sel.partition(".")
            if "#" in sel:
                assert (tag, rest) in ids, (p, sel)
            else:
                assert shape.get(sel, 0) >= 1, (p, sel)
    bob = shapes["/r/communal/commit/bob"]
    assert (bob["rect.cell"], bob["tr.change"]) == (20, 2)
    shot.communicate(timeout=120)
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")) == (800, 600)


def test_new_commits_show_after_reindex(hubrepo: Path, tmp_path: Path) -> None:
    """Two repositories in one hub, each with its own commits; pages are cached until the
    index changes: a reindex makes a new commit visible in its own repository only."""
    copy = tmp_path / "copy"
    shutil.copytree(hubrepo, copy, symlinks=True)
    h = hub_for([str(hubrepo), str(copy)], f"sqlite:///{tmp_path / 'c.sqlite'}")
    assert h.reindex() == {"communal": 7, "copy": 7}

    def subjects(url: str, name: str) -> list[str]:
        return [c["subject"] for c in json.loads(get(f"{url}/api/r/{name}/commits")[1])["commits"]]

    with serving(h) as url:
        assert json.loads(get(url + "/api/")[1]) == {"repos": ["communal", "copy"]}
        assert subjects(url, "copy") == subjects(url, "communal")
        assert len(subjects(url, "copy")) == 7
        Shell(copy, lambda _line: None)("git", "commit", "-q", "--allow-empty", "-m", "later")
        assert h.reindex() == {"communal": 0, "copy": 1}
        time.sleep(1.1)  # the cache reads the index generation at most once a second
        assert subjects(url, "copy")[:1] == ["later"]
        assert "later" not in subjects(url, "communal")
        assert len(subjects(url, "communal")) == 7


def test_hub_command_serves(hubrepo: Path, tmp_path: Path) -> None:
    """The real ``potluck hub``: indexes, says where it serves, answers; a bad port is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = f"sqlite:///{tmp_path / 'cli.sqlite'}"
    cmd = [f"{BIN}/potluck", "hub", str(hubrepo), "--port", str(port), "--db", db]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                status, body, _ = get(f"http://127.0.0.1:{port}/api/")
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline, "potluck hub did not answer"
                time.sleep(0.2)
        assert (status, json.loads(body)) == (200, {"repos": ["communal"]})
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert out == ""
    assert err.splitlines()[:2] == [
        "potluck hub: communal: 7 new commit(s) indexed",
        f"potluck hub: serving http://127.0.0.1:{port}/",
    ]
    r = CliRunner().invoke(cli, ["hub", str(hubrepo), "--port", "0", "--db", db])
    assert (r.exit_code, r.output.splitlines()[0]) == (2, "potluck: error: port 0 is out of range")


def test_index_of_another_layout_is_rebuilt(tmp_path: Path) -> None:
    """An index written by another version (a table without today's columns) is made again."""
    import sqlite3

    db = tmp_path / "old.sqlite"
    with sqlite3.connect(db) as c:
        c.execute("create table commits (repo text, sha text)")
        c.execute("insert into commits values ('r', 'abc')")
    engine = ix.engine_for(f"sqlite:///{db}")
    with engine.connect() as c:
        assert ix.rows(c, sa.select(ix.COMMITS)) == []
        assert ix.get_state(c, "", "schema") == ix.SCHEMA
        assert [col["name"] for col in sa.inspect(c).get_columns("commits")][-2:] == [
            "paths",
            "blobs",
        ]
    engine.dispose()
