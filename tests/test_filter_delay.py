"""Delayed checkout (gitattributes(5) "Delay"): the filter process answers smudges of files whose
objects are missing with ``status=delayed`` and fetches them all in one batch when git asks
``list_available_blobs``; real git, the loopback giftless LFS server."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, Run, run_in, save_st
from potluck.objects.manifest import parse
from test_sync import sha, store_oids
from test_sync_servers import use_lfs
from testsupport.servers import LfsServer, lfs_server  # noqa: F401

SHARDS = [f"model-{i + 1:05d}-of-00008.safetensors" for i in range(8)]
BATCH = "/objects/batch"


@pytest.fixture(scope="module")
def published(
    lfs_server: LfsServer,  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, Path]:
    """A repository with a model in 8 safetensors shards committed and pushed to a bare hub
    (objects on the module's giftless), made once for the module: (repo, hub)."""
    lfs_server.reset()
    root = tmp_path_factory.mktemp("published")
    repo, hub = root / "repo", root / "hub.git"
    repo.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        (root / "_home").mkdir()
        mp.setenv("HOME", str(root / "_home"))
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        for who in ("AUTHOR", "COMMITTER"):
            mp.setenv(f"GIT_{who}_NAME", "Test")
            mp.setenv(f"GIT_{who}_EMAIL", "test@example.invalid")
        mp.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
        git = run_in(repo)
        git("git", "init", "-q", "-b", "main")
        git("potluck", "init")
        git("potluck", "track", "*.safetensors")
        git("git", "init", "-q", "--bare", "-b", "main", str(hub))
        git("git", "remote", "add", "origin", str(hub))
        use_lfs(git, repo, lfs_server)
        rng = np.random.default_rng(7)
        for i, name in enumerate(SHARDS):
            save_st(
                repo / name,
                {f"layers.{i}.w": rng.normal(0, 0.02, (32, 32)).astype(np.float32),
                 f"layers.{i}.b": np.full(32, i, np.float32)},
            )  # fmt: skip
        git("git", "add", ".gitattributes", *SHARDS)
        git("git", "commit", "-q", "-m", "8 shards")
        git("git", "push", "-q", "origin", "main")
    return repo, hub


@pytest.fixture
def srv(lfs_server: LfsServer, published: tuple[Path, Path]) -> LfsServer:  # noqa: F811
    """The module's giftless with the shards, reset: no faults, zero counters."""
    lfs_server.reset(new_repo=False)
    return lfs_server


@pytest.fixture
def repo(published: tuple[Path, Path]) -> Path:
    """The published repository (tests leave it as they found it)."""
    return published[0]


@pytest.fixture
def pushed(published: tuple[Path, Path], srv: LfsServer) -> Path:
    """The bare hub the shards were pushed to."""
    return published[1]


def clone_traced(
    tmp_path: Path, hub: Path, name: str, config: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess[str], str]:
    """``potluck clone`` with git's packet trace (which shows the filter protocol), every git
    command given ``config``."""
    trace = tmp_path / f"{name}.trace"
    items = list((config or {}).items())
    env = dict(os.environ, GIT_TRACE_PACKET=str(trace), GIT_CONFIG_COUNT=str(len(items)))
    for i, (key, value) in enumerate(items):
        env[f"GIT_CONFIG_KEY_{i}"], env[f"GIT_CONFIG_VALUE_{i}"] = key, value
    r = subprocess.run(
        ["potluck", "clone", str(hub), str(tmp_path / name)],
        cwd=tmp_path, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return r, trace.read_text(errors="replace")


def test_clone_of_8_shards_fetches_them_in_one_batch(
    repo: Path, pushed: Path, srv: LfsServer, tmp_path: Path
) -> None:
    r, trace = clone_traced(tmp_path, pushed, "clone")
    assert r.returncode == 0, r.stderr
    assert "capability=delay" in trace
    assert trace.count("status=delayed") == 8
    assert trace.count("command=list_available_blobs") == 2  # the batch, then "none left"
    assert [p for p in srv.paths("POST") if p.endswith(BATCH)] == [srv.paths("POST")[0]]
    gets = srv.paths("GET")
    assert len(gets) == len(set(gets)) == 24  # 16 tensors and 8 headers, each once
    for name in SHARDS:
        assert sha(tmp_path / "clone" / name) == sha(repo / name)
    assert run_in(tmp_path / "clone")("git", "status", "--porcelain") == ""
    srv.reset_counters()  # potluck.delayCheckout=false: one batch per file, as before
    r, trace = clone_traced(tmp_path, pushed, "per-file", {"potluck.delayCheckout": "false"})
    assert r.returncode == 0, r.stderr
    assert "status=delayed" not in trace and trace.count("can-delay=1") == 8
    assert len([p for p in srv.paths("POST") if p.endswith(BATCH)]) == 8
    for name in SHARDS:
        assert sha(tmp_path / "per-file" / name) == sha(repo / name)


def test_failed_delayed_fetch_leaves_manifests_and_pull_completes(
    repo: Path, pushed: Path, srv: LfsServer, tmp_path: Path
) -> None:
    srv.fail_next(1000, status=403, method="GET")  # downloads refused (no retries)
    r, trace = clone_traced(tmp_path, pushed, "broken")
    broken = tmp_path / "broken"
    assert r.returncode == 1
    assert trace.count("status=delayed") == 8
    assert f"cloned into {broken}, but 8 file(s) could not be fetched" in r.stderr
    assert "fetching the tensors of 8 files failed: download of object" in r.stderr
    assert r.stderr.count("left as a manifest: 3 of 3 objects are not in the local store") == 8
    assert "Traceback" not in r.stderr
    for name in SHARDS:
        assert (broken / name).read_bytes().startswith(b"potluck manifest v1\n")
    assert store_oids(broken) == set()  # nothing half-written entered the store
    assert not list((broken / ".git" / "potluck" / "tmp" / "incoming" / "fresh").glob("*"))
    srv.reset(new_repo=False)
    b = run_in(broken)
    b("potluck", "pull")
    for name in SHARDS:
        assert sha(broken / name) == sha(repo / name)
    assert b("git", "status", "--porcelain") == ""


def test_object_missing_on_the_remote_costs_only_its_file(
    repo: Path, git: Run, pushed: Path, srv: LfsServer, tmp_path: Path
) -> None:
    shard = SHARDS[2]
    w = parse(git("git", "cat-file", "blob", f"HEAD:{shard}").encode()).tensors()["layers.2.w"]
    stored = srv.object_path(w.oid)
    aside = tmp_path / "aside"
    stored.rename(aside)  # the remote lost one tensor of shard 3
    r, trace = clone_traced(tmp_path, pushed, "holey")
    holey = tmp_path / "holey"
    assert r.returncode == 1 and trace.count("status=delayed") == 8
    assert "fetching the tensors of 8 files at once failed" in r.stderr
    assert f"{shard}: fetching its tensors failed: 1 object(s) missing on" in r.stderr
    assert f"{shard} left as a manifest: 3 of 3 objects are not in the local store" in r.stderr
    assert f"cloned into {holey}, but 1 file(s) could not be fetched" in r.stderr
    assert "Traceback" not in r.stderr
    assert (holey / shard).read_bytes().startswith(b"potluck manifest v1\n")
    for name in SHARDS:
        if name != shard:
            assert sha(holey / name) == sha(repo / name)
    aside.rename(stored)  # pushed again, say
    h = run_in(holey)
    h("potluck", "pull")
    assert sha(holey / shard) == sha(repo / shard)
    assert h("git", "status", "--porcelain") == ""


def test_checkout_with_everything_local_is_not_delayed(
    repo: Path, git: Run, pushed: Path, srv: LfsServer, tmp_path: Path
) -> None:
    before = {name: sha(repo / name) for name in SHARDS}
    for name in SHARDS:
        (repo / name).unlink()
    trace = tmp_path / "local.trace"
    env = dict(os.environ, GIT_TRACE_PACKET=str(trace))
    subprocess.run(["git", "checkout", "--", "."], cwd=repo, check=True, env=env)
    text = trace.read_text(errors="replace")
    assert "capability=delay" in text and text.count("can-delay=1") == 8
    assert "status=delayed" not in text and "list_available_blobs" not in text
    assert {name: sha(repo / name) for name in SHARDS} == before
    assert srv.requests == []  # nothing asked of the remote


def test_a_smudge_that_decodes_keeps_freed_buffers(
    repo: Path, git: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The filter process decodes a checkpoint with freed multi-MiB buffers kept for reuse
    (``reuse_freed_memory``, as transfers do); a file left as its manifest decodes nothing."""
    import io

    from potluck.git.filter import PotluckFilter
    from potluck.git.repo import Repo
    from potluck.remote import memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "reuse_freed_memory", lambda: calls.append(1) or True)
    name = SHARDS[0]
    manifest = git("git", "cat-file", "blob", f"HEAD:{name}").encode()
    out = io.BytesIO()
    PotluckFilter(Repo(repo)).smudge(name, io.BytesIO(manifest), out)
    assert out.getvalue() == (repo / name).read_bytes() and calls == [1]

    m = parse(manifest)
    lost = manifest.replace(m.entries[-1].oid.encode(), b"0" * 64)  # an object no store has
    out = io.BytesIO()
    PotluckFilter(Repo(repo)).smudge(name, io.BytesIO(lost), out)
    assert out.getvalue() == lost and calls == [1]


def test_a_smudge_is_answered_before_its_fetched_objects_are_stored(
    repo: Path, tmp_path: Path
) -> None:
    """The verified downloads a file was written from go into the store (``settle``) after
    git has the file's answer: before the filter's next request, not before its reply."""
    import io

    from potluck.git.filter import PotluckFilter
    from potluck.git.repo import Repo
    from potluck.objects.manifest import Manifest
    from potluck.ops.vcs import Wanted, store_fresh

    source = Repo(repo)
    target = tmp_path / "target"
    target.mkdir()
    run_in(target)("git", "init", "-q")
    run_in(target)("potluck", "init")
    events: list[str] = []

    class Downloads:
        """Hands out plain files of a manifest's objects as a fetch would (``fresh``)."""

        def __init__(self) -> None:
            self.wanted, self.fresh = Wanted(), {}

        def __call__(self, m: Manifest, path: str) -> dict[str, Path]:
            events.append(f"fetch {path}")
            self.wanted.add_manifest(m, path)
            for oid in dict.fromkeys(m.oids()):
                self.fresh[oid] = tmp_path / oid
                self.fresh[oid].write_bytes(source.odb.read_bytes(oid))
            return dict(self.fresh)

        def settle(self) -> None:
            events.append("settle")
            store_fresh(Repo(target).odb, self.wanted, self.fresh)
            self.fresh = {}

        def pull_hint(self) -> str:
            return "pull"

    filt = PotluckFilter(Repo(target), None, Downloads())
    blob = {n: run_in(repo)("git", "cat-file", "blob", f"HEAD:{n}").encode() for n in SHARDS}
    for name in SHARDS[:2]:
        out = io.BytesIO()
        filt.smudge(name, io.BytesIO(blob[name]), out)
        assert out.getvalue() == (repo / name).read_bytes()
    assert events == [f"fetch {SHARDS[0]}", "settle", f"fetch {SHARDS[1]}"]
    out = io.BytesIO()
    filt.clean("x.safetensors", io.BytesIO(blob[SHARDS[0]]), out)  # a manifest stays as it is
    assert out.getvalue() == blob[SHARDS[0]] and events[-1] == "settle"
    stored = Repo(target).odb
    assert all(stored.has(o) for n in SHARDS[:2] for o in parse(blob[n]).oids())
