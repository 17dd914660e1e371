"""Push, fetch, pull and clone end to end with real git, through a bare repository on disk
(objects in its ``lfs/`` directory: git-lfs's layout for local remotes)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from conftest import Run, model, run_in, save_st
from potluck.git.plumbing import Git
from potluck.git.wireindex import read_index
from potluck.objects.manifest import Entry, parse
from potluck.ops.vcs.wire import WireEntry

FILE = "m.safetensors"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def remote_objects(bare: Path) -> dict[str, int]:
    root = bare / "lfs" / "objects"
    return {p.name: p.stat().st_size for p in root.rglob("*") if p.is_file()}


def wire_index(bare: Path) -> dict[str, WireEntry]:
    """The wire index the remote repository holds (``refs/potluck/wire``)."""
    git = Git(bare)
    return read_index(git, git.rev_parse("refs/potluck/wire"))


def on_remote(
    bare: Path, entries: Iterable[Entry], stored: Callable[[str], int] | None = None
) -> dict[str, tuple[str, int]]:
    """For each logical object: the remote object that carries it and that object's size.
    Fails unless it is there (``stored(oid)`` gives a remote object's size), either under
    its own id (plain bytes) or, through the wire index, as an encoded object."""
    index = wire_index(bare)
    stored = stored or remote_objects(bare).__getitem__
    out = {}
    for e in entries:
        if e.oid in index:
            w = index[e.oid].wire
            assert stored(w.oid) == w.size
            out[e.oid] = (w.oid, w.size)
        else:
            assert stored(e.oid) == e.size, e
            out[e.oid] = (e.oid, e.size)
    return out


def wire_bytes(carriers: dict[str, tuple[str, int]], oids: Iterable[str] | None = None) -> int:
    """Bytes of the distinct remote objects carrying ``oids`` (all by default)."""
    keep = carriers if oids is None else {o: carriers[o] for o in oids}
    return sum(dict(keep.values()).values())


def genuine(objects: dict[str, Path]) -> None:
    """Every remote object is named by the sha256 of its content (a genuine LFS object)."""
    for oid, path in objects.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == oid


def store_oids(repo: Path) -> set[str]:
    root = repo / ".git" / "potluck" / "objects"
    return {p.parent.name + p.name for p in root.glob("??/*") if len(p.name) == 62}


def commit_model(git: Run, root: Path, tensors: dict[str, np.ndarray], msg: str) -> None:
    save_st(root / FILE, tensors)
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", msg)


def test_git_push_uploads_only_new_objects_and_clone_reproduces_bytes(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    first = remote_objects(hub)
    v1 = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    carriers = on_remote(hub, v1.entries)
    assert set(first) == {oid for oid, _ in carriers.values()}  # v1's objects, nothing else
    genuine({p.name: p for p in (hub / "lfs" / "objects").rglob("*") if p.is_file()})
    # the zero biases and the header compress, but they save under 1 % of the push
    # (ENCODED_MIN_GAIN): everything travels plain and no wire index is published
    assert wire_index(hub) == {}
    assert first == {e.oid: e.size for e in v1.entries}
    m2 = dict(m1, **{"layers.1.w": m1["layers.1.w"] + np.float32(1e-3)})
    commit_model(git, repo, m2, "v2")
    git("git", "push", "-q", "origin", "main")
    new = set(remote_objects(hub)) - set(first)
    v2 = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    changed = v2.tensors()["layers.1.w"]
    assert new == {on_remote(hub, [changed])[changed.oid][0]}  # only the changed tensor travels
    clone = tmp_path / "clone"
    out = run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    assert "cloned into" in out
    assert sha(clone / FILE) == sha(repo / FILE)
    c = run_in(clone)
    assert c("git", "status", "--porcelain") == ""
    assert json.loads(c("potluck", "status", "--json"))["not_materialized"] == []
    # checkout copied the verified downloads and stored them meanwhile: all in the store,
    # every object re-hashes to its id, and no download is left behind
    assert "ok: all objects verified" in c("potluck", "fsck")
    assert store_oids(clone) >= {e.oid for e in v2.entries}
    incoming = clone / ".git" / "potluck" / "tmp" / "incoming"
    assert [p for p in incoming.rglob("*") if p.is_file()] == []
    c("git", "checkout", "-q", "HEAD~1")
    save_st(tmp_path / "v1.safetensors", m1)
    assert sha(clone / FILE) == sha(tmp_path / "v1.safetensors")


def test_two_clones_push_and_pull_each_others_commits(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "-u", "origin", "main")
    other = tmp_path / "other"
    run_in(tmp_path)("potluck", "clone", str(hub), str(other))
    o = run_in(other)
    m2 = dict(m1, embed=m1["embed"] * np.float32(2))
    commit_model(o, other, m2, "v2 from other")
    o("git", "push", "-q", "origin", "main")
    git("git", "pull", "-q", "--ff-only", "origin", "main")  # smudge fetches what is missing
    assert sha(repo / FILE) == sha(other / FILE)
    m3 = dict(m2, **{"layers.0.b": np.ones(64, np.float32)})
    commit_model(git, repo, m3, "v3 from repo")
    git("git", "push", "-q", "origin", "main")
    o("git", "pull", "-q", "--ff-only")
    assert sha(repo / FILE) == sha(other / FILE)
    fresh = tmp_path / "fresh"
    run_in(tmp_path)("potluck", "clone", str(hub), str(fresh))
    assert sha(fresh / FILE) == sha(repo / FILE)
    run_in(fresh)("potluck", "fsck")  # exits non-zero on any missing or corrupt object


def test_no_data_clone_then_selected_fetch_load_on_demand_and_pull(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    part = tmp_path / "part"
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(part))
    p = run_in(part)
    assert (part / FILE).read_bytes().startswith(b"potluck manifest v1\n")
    assert p("git", "status", "--porcelain") == ""  # a placeholder is not a modification
    st = json.loads(p("potluck", "status", "--json"))["not_materialized"]
    assert [(r["path"], r["tensors"], r["tensors_missing"]) for r in st] == [(FILE, 7, 7)]
    m = parse((part / FILE).read_bytes())
    tensors = m.tensors()
    before = store_oids(part)
    out = json.loads(p("potluck", "fetch", "--include", "layers.1.*", "--json"))
    got = store_oids(part) - before
    header = {e.oid for e in m.entries} - {t.oid for t in tensors.values()}
    want = {tensors["layers.1.w"].oid, tensors["layers.1.b"].oid} | header
    assert got == want and out["objects"] == len(want)
    import potluck

    arr = potluck.load(str(part / FILE), names=["layers.2.w"])["layers.2.w"]
    np.testing.assert_array_equal(arr, m1["layers.2.w"])
    assert store_oids(part) - before == want | {tensors["layers.2.w"].oid}  # exactly that one
    pulled = p("potluck", "pull")
    assert f"checked out {FILE}" in pulled
    save_st(tmp_path / "want.safetensors", m1)
    assert sha(part / FILE) == sha(tmp_path / "want.safetensors")
    assert p("git", "status", "--porcelain") == ""
    assert json.loads(p("potluck", "status", "--json"))["not_materialized"] == []


def test_clone_include_keeps_selection_for_later_checkouts(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "origin", "main")
    part = tmp_path / "part"
    out = run_in(tmp_path)("potluck", "clone", "--include", "embed", str(hub), str(part))
    assert "1 file(s) left as manifests" in out
    tensors = parse((part / FILE).read_bytes()).tensors()
    assert tensors["embed"].oid in store_oids(part)
    assert tensors["layers.0.w"].oid not in store_oids(part)
    p = run_in(part)
    p("potluck", "pull", "--include", "*")
    assert sha(part / FILE) == sha(repo / FILE)


def test_push_fails_before_sending_when_objects_are_missing_locally(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng)
    commit_model(git, repo, m1, "v1")
    git("git", "push", "-q", "--no-verify", "origin", "main")  # the hook did not run
    assert remote_objects(hub) == {}
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    lost = m.tensors()["layers.2.w"].oid
    (repo / ".git" / "potluck" / "objects" / lost[:2] / lost[2:]).unlink()
    head = git("git", "rev-parse", "HEAD").strip()
    err = git("potluck", "push", "--all", check=False)
    assert "cannot push: 1 object(s)" in err and "tensor 'layers.2.w'" in err
    assert f"commit {head[:10]}" in err and "nothing was uploaded" in err
    assert remote_objects(hub) == {}  # nothing was sent
    commit_model(git, repo, dict(m1, embed=m1["embed"] + 1), "v2")  # stores layers.2.w again
    (repo / ".git" / "potluck" / "objects" / lost[:2] / lost[2:]).unlink()
    err = git("git", "push", "origin", "main", check=False)
    assert "cannot push" in err and "layers.2.w" in err
    assert (
        git("git", "ls-remote", str(hub), "refs/heads/main").split()[0]
        != git("git", "rev-parse", "HEAD").strip()
    )  # the hook stopped the push


def test_pre_push_is_chained_with_an_existing_hook(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    hook = repo / ".git" / "hooks" / "pre-push"
    text = hook.read_text()
    hook.write_text(text.replace("#!/bin/sh\n", "#!/bin/sh\necho other-hook-ran >> hook.log\n"))
    commit_model(git, repo, model(rng), "v1")
    git("git", "push", "-q", "origin", "main")
    assert (repo / "hook.log").read_text() == "other-hook-ran\n"
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    assert set(remote_objects(hub)) == {oid for oid, _ in on_remote(hub, m.entries).values()}
    git("potluck", "init")  # idempotent: the line is not added twice
    assert hook.read_text().count("pre-push") == 1


def test_checkout_without_reachable_objects_leaves_manifest(
    repo: Path, git: Run, rng, tmp_path: Path
) -> None:
    commit_model(git, repo, model(rng), "v1")
    clone = tmp_path / "clone"
    out = run_in(tmp_path)("potluck", "clone", str(repo), str(clone), check=False)  # not pushed
    assert f"cloned into {clone}, but 1 file(s) could not be fetched" in out  # exit 1, usable
    assert (clone / FILE).read_bytes().startswith(b"potluck manifest v1\n")
    st = json.loads(run_in(clone)("potluck", "status", "--json"))["not_materialized"]
    assert st[0]["path"] == FILE and st[0]["tensors_missing"] == 7


def test_corrupt_local_object_is_never_uploaded(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    git("git", "config", "potluck.encodedTransfer", "false")  # send plain bytes (decoded)
    commit_model(git, repo, model(rng), "v1")
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    bad = m.tensors()["layers.1.w"].oid
    path = repo / ".git" / "potluck" / "objects" / bad[:2] / bad[2:]
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # inside the last chunk's payload
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    err = git("git", "push", "origin", "main", check=False)
    assert "failed to push some refs" in err and bad[:12] in err
    assert bad not in remote_objects(hub)  # the damaged object never reached the remote


def test_push_json_reports_plain_and_encoded_uploads(
    repo: Path, git: Run, hub: Path, rng, tmp_path: Path
) -> None:
    m1 = model(rng, d=128)
    commit_model(git, repo, m1, "v1")
    first = json.loads(git("potluck", "push", "--json"))
    assert first["checked"] == first["uploaded"] == len(remote_objects(hub))
    assert first["encoded"] == len(wire_index(hub))  # zero biases and the header compress
    m2 = {k: v.copy() for k, v in m1.items()}
    m2["embed"].reshape(-1)[::97] = 0.5  # ~1 % of the entries
    commit_model(git, repo, m2, "v2")
    second = json.loads(git("potluck", "push", "--json"))
    embed = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode()).tensors()["embed"]
    assert (second["uploaded"], second["encoded"]) == (1, 1)
    assert second["already_there"] == second["checked"] - 1
    assert 0 < second["bytes"] < embed.size // 10
    assert (
        wire_index(hub)[embed.oid].base
        == parse(git("git", "cat-file", "blob", f"HEAD~1:{FILE}").encode()).tensors()["embed"].oid
    )
    again = json.loads(git("potluck", "push", "--json"))
    assert (again["uploaded"], again["bytes"]) == (0, 0)
