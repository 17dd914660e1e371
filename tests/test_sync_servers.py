"""git push / clone / partial fetch end to end against real servers on loopback: giftless (Git
LFS batch API, with fault injection and authentication) and moto (S3)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, model, run_in
from potluck.objects.manifest import parse
from test_sync import FILE, commit_model, genuine, on_remote, sha, store_oids, wire_bytes
from testsupport.servers import LfsServer, MotoS3, lfs_server, moto_s3  # noqa: F401


def size_on(server: LfsServer) -> Callable[[str], int]:
    """The size of an object stored on the giftless server."""
    return lambda oid: server.object_path(oid).stat().st_size


@pytest.fixture
def srv(lfs_server: LfsServer) -> LfsServer:  # noqa: F811
    """The module's giftless, reset: no faults, zero counters, a fresh repository."""
    lfs_server.reset()
    return lfs_server


def use_lfs(git: Run, root: Path, server: LfsServer) -> None:
    """Commit a .lfsconfig naming the server, as a project hosted on an LFS server would."""
    (root / ".lfsconfig").write_text(f'[lfs]\n\turl = "{server.url}"\n')
    git("git", "add", ".lfsconfig")
    git("git", "commit", "-q", "-m", "lfs endpoint")


def manifest_at(git: Run, rev: str = "HEAD") -> object:
    return parse(git("git", "cat-file", "blob", f"{rev}:{FILE}").encode())


def test_lfs_push_clone_and_pull_between_two_clones(
    repo: Path, git: Run, hub: Path, srv: LfsServer, rng, tmp_path: Path
) -> None:
    use_lfs(git, repo, srv)
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    v1 = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    carriers = on_remote(hub, v1.entries, size_on(srv))
    assert srv.bytes_received == wire_bytes(carriers)  # each object once
    genuine({oid: srv.object_path(oid) for oid, _ in carriers.values()})  # named by sha256
    srv.reset_counters()
    other = tmp_path / "other"
    run_in(tmp_path)("potluck", "clone", str(hub), str(other))
    assert sha(other / FILE) == sha(repo / FILE)
    assert srv.bytes_sent == wire_bytes(carriers)
    o = run_in(other)
    fresh = rng.normal(0, 0.02, (64, 64)).astype(np.float32)
    m2 = dict(m1, **{"layers.2.w": fresh})
    commit_model(o, other, m2, "v2")
    srv.reset_counters()
    o("git", "push", "-q", "origin", "main")
    changed = manifest_at(o).tensors()["layers.2.w"]  # type: ignore[attr-defined]
    assert srv.bytes_received == changed.size  # only the changed tensor, as plain bytes
    git("git", "pull", "-q", "--ff-only", "origin", "main")
    assert sha(repo / FILE) == sha(other / FILE)
    m3 = {k: v.copy() for k, v in m2.items()}  # a 1 %-sparse edit of the embedding
    flat = m3["embed"].reshape(-1)
    idx = rng.choice(flat.size, flat.size // 100, replace=False)
    flat[idx] = rng.normal(0, 0.02, idx.size).astype(np.float32)
    commit_model(git, repo, m3, "v3")
    srv.reset_counters()
    git("git", "push", "-q", "origin", "main")
    embed = manifest_at(git).tensors()["embed"]  # type: ignore[attr-defined]
    assert 0 < srv.bytes_received < embed.size // 10  # an XOR delta travels, not the tensor
    srv.reset_counters()
    o("git", "pull", "-q", "--ff-only")
    assert sha(repo / FILE) == sha(other / FILE)
    assert 0 < srv.bytes_sent < embed.size // 10  # the other clone has the base already


def test_lfs_partial_fetch_moves_only_requested_tensors(
    repo: Path, git: Run, hub: Path, srv: LfsServer, rng, tmp_path: Path
) -> None:
    use_lfs(git, repo, srv)
    commit_model(git, repo, model(rng, d=128), "v1")
    git("git", "push", "-q", "origin", "main")
    part = tmp_path / "part"
    srv.reset_counters()
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(part))
    assert srv.bytes_sent == 0
    p = run_in(part)
    m = parse((part / FILE).read_bytes())
    t = m.tensors()
    carriers = on_remote(hub, m.entries, size_on(srv))
    header = {e.oid for e in m.entries} - {x.oid for x in t.values()}
    p("potluck", "fetch", "--include", "layers.0.w")
    assert srv.bytes_sent == wire_bytes(carriers, {t["layers.0.w"].oid} | header)
    srv.reset_counters()
    import potluck

    got = potluck.load(str(part / FILE), names=["embed"])["embed"]
    assert got.shape == (256, 128) and srv.bytes_sent == wire_bytes(carriers, {t["embed"].oid})
    srv.reset_counters()
    p("potluck", "pull", "--include", "*")
    rest = {x.oid for x in t.values()} - {t["embed"].oid, t["layers.0.w"].oid}
    assert srv.bytes_sent == wire_bytes(carriers, rest)
    assert sha(part / FILE) == sha(repo / FILE)


def test_lfs_faults_never_corrupt_the_store_and_a_rerun_completes(
    repo: Path, git: Run, hub: Path, srv: LfsServer, rng, tmp_path: Path
) -> None:
    use_lfs(git, repo, srv)
    commit_model(git, repo, model(rng, d=128), "v1")
    srv.fail_next(2, status=503, path_contains="/objects/batch")
    git("git", "push", "-q", "origin", "main")  # retried after the 503s
    clone = tmp_path / "clone"
    srv.truncate_next(3, keep_bytes=1000)  # cut bodies: retried (resumed or restarted)
    srv.fail_next(2, status=500, method="GET")
    run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    assert sha(clone / FILE) == sha(repo / FILE)
    assert "ok: all objects verified" in run_in(clone)("potluck", "fsck")
    broken = tmp_path / "broken"
    srv.fail_next(1000, status=500, method="GET")  # the server stays broken
    out = run_in(tmp_path)("potluck", "clone", str(hub), str(broken), check=False)
    assert "left as a manifest" in out
    assert (broken / FILE).read_bytes().startswith(b"potluck manifest v1\n")
    assert store_oids(broken) == set()  # nothing half-written entered the store
    srv.reset(new_repo=False)
    b = run_in(broken)
    b("potluck", "pull")
    assert sha(broken / FILE) == sha(repo / FILE)
    assert b("git", "status", "--porcelain") == ""


def test_lfs_credentials_come_from_git_credential_helpers(
    repo: Path, git: Run, hub: Path, srv: LfsServer, rng, tmp_path: Path
) -> None:
    use_lfs(git, repo, srv)
    commit_model(git, repo, model(rng), "v1")
    srv.requires_auth("alice", "s3cret")
    err = git("git", "push", "origin", "main", check=False)
    assert "requires authentication (HTTP 401); no credentials found" in err  # no helper
    assert "failed to push some refs" in err  # the hook stopped the push
    store = tmp_path / "creds"
    host = srv.base.split("://", 1)[1]
    store.write_text(f"http://alice:s3cret@{host}\n")
    git("git", "config", "credential.helper", f"store --file={store}")
    git("git", "push", "-q", "origin", "main")
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    assert srv.bytes_received == wire_bytes(on_remote(hub, m.entries, size_on(srv)))
    store.write_text(f"http://alice:wrong@{host}\n")
    commit_model(git, repo, model(rng), "v2")
    err = git("git", "push", "origin", "main", check=False)
    assert "authentication failed" in err and "failed to push some refs" in err
    assert store.read_text() == ""  # git's helper forgot the rejected credentials


def test_s3_remote_push_and_no_data_clone_then_pull(
    repo: Path, git: Run, hub: Path, moto_s3: MotoS3, rng, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_s3.KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_s3.SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", moto_s3.REGION)
    bucket = moto_s3.create_bucket()
    url = f"s3://{bucket}/team/model"
    git("potluck", "remote", "set-url", "origin", url, "-o", f"endpoint_url={moto_s3.endpoint}")
    shown = json.loads(git("potluck", "remote", "show", "--json"))
    assert shown["url"] == url and shown["source"] == "remote.origin.potluckurl"
    commit_model(git, repo, model(rng), "v1")
    git("git", "push", "-q", "origin", "main")
    keys = {o["Key"] for o in moto_s3.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    sizes = {
        o["Key"].rsplit("/", 1)[1]: o["Size"]
        for o in moto_s3.client().list_objects_v2(Bucket=bucket)["Contents"]
    }
    carriers = on_remote(hub, m.entries, sizes.__getitem__)
    assert keys == {f"team/model/objects/{w[:2]}/{w[2:4]}/{w}" for w, _ in carriers.values()}
    clone = tmp_path / "clone"
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(clone))
    c = run_in(clone)
    c("potluck", "remote", "set-url", "origin", url, "-o", f"endpoint_url={moto_s3.endpoint}")
    c("potluck", "pull")
    assert sha(clone / FILE) == sha(repo / FILE)
