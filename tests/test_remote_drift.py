"""Remote drift and wire-index faults (issue 14 items 2 and 13), end to end with real git and a
bare repository whose ``lfs/`` directory is the object store: what the local bookkeeping (the
wire index, the remote-tracking refs) says a remote has is never trusted without asking the
object store, and a wrong index entry falls back to the plain object."""

from __future__ import annotations

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np

from conftest import Run, model, run_in, save_st
from potluck.git.plumbing import Git
from potluck.objects.manifest import Manifest, parse
from potluck.ops.vcs.wire import INDEX_MAGIC, WireEntry
from potluck.remote import ObjectRef
from test_sync import FILE, commit_model, remote_objects, sha, wire_index


def head_manifest(bare: Path, rev: str = "main") -> Manifest:
    return parse(run_in(bare)("git", "cat-file", "blob", f"{rev}:{FILE}").encode())


def object_file(store: Path, oid: str) -> Path:
    return store / "objects" / oid[:2] / oid[2:4] / oid


def fake(n: int) -> str:
    return hashlib.sha256(f"fake {n}".encode()).hexdigest()


def set_index(bare: Path, entries: list[WireEntry]) -> None:
    """Replace the remote's wire index (``refs/potluck/wire``) by one blob: its entries with
    ``entries`` put in (or over them)."""
    git = Git(bare)
    merged = {**wire_index(bare), **{e.oid: e for e in entries}}
    text = INDEX_MAGIC + "".join(e.line() + "\n" for e in merged.values()).encode()
    blob = git.run("hash-object", "-w", "--stdin", input=text).decode().strip()
    tree = git.run("mktree", input=f"100644 blob {blob}\t{blob}\n".encode()).decode().strip()
    commit = git.run("commit-tree", tree, "-m", "index").decode().strip()
    git.run("update-ref", "refs/potluck/wire", commit)


def pushed(git: Run, repo: Path, rng: np.random.Generator, **extra: np.ndarray) -> Manifest:
    commit_model(git, repo, dict(model(rng), **extra), "v1")
    git("git", "push", "-q", "origin", "main")
    return parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())


# -- item 2: a new object store behind the same git remote ------------------------------------


def test_set_url_to_a_new_store_then_push_all_sends_everything_and_it_clones(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m = pushed(git, repo, rng, mask=np.zeros(16384, np.float32))
    index = wire_index(hub)
    assert index  # the zero tensors and the header travelled encoded
    store = tmp_path / "new-store"
    git("potluck", "remote", "set-url", "origin", f"file://{store}")
    out = git("potluck", "push", "origin", "--all", check=False)
    assert f"file://{store}: uploaded {len(set(m.oids()))} objects" in out
    assert f"{len(index)} stale wire index entries re-sent as plain bytes" in out
    assert {p.name for p in (store / "objects").rglob("*") if p.is_file()} == set(m.oids())
    # a clone that reads from the new store: the index still names wire objects that are not
    # there, so every such object comes as its plain bytes
    clone = tmp_path / "clone"
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(clone))
    c = run_in(clone)
    c("potluck", "remote", "set-url", "origin", f"file://{store}")
    out = c("potluck", "pull", check=False)
    assert "fetching its plain bytes instead" in out
    assert sha(clone / FILE) == sha(repo / FILE)
    assert json.loads(c("potluck", "status", "--json"))["not_materialized"] == []


def test_git_push_to_a_recreated_empty_remote_uploads_every_object(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m = pushed(git, repo, rng)
    assert set(remote_objects(hub)) >= {e.oid for e in m.tensors().values() if e.size > 4096}
    # the remote is deleted and made again, empty; the remote-tracking ref still says main
    # is there
    run_in(tmp_path)("rm", "-rf", str(hub))
    run_in(tmp_path)("git", "init", "-q", "--bare", "-b", "main", str(hub))
    assert git("git", "rev-parse", "origin/main") == git("git", "rev-parse", "HEAD")
    out = git("git", "push", "origin", "main", check=False)
    n = len(set(m.oids()))
    assert f"lacks {n} of {n} sampled objects of commits the git remote already has" in out
    clone = tmp_path / "clone"
    run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    assert sha(clone / FILE) == sha(repo / FILE)


def test_push_verify_restores_objects_the_remote_lost(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m1 = dict(model(rng), extra=np.ones(16384, np.float32))  # compresses: travels encoded
    commit_model(git, repo, m1, "v1")
    v1 = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    m2 = {k: v for k, v in m1.items() if k != "extra"}
    m2["embed"] = rng.normal(0, 0.02, m1["embed"].shape).astype(np.float32)  # no delta
    commit_model(git, repo, m2, "v2")
    git("git", "push", "-q", "origin", "main")
    index = wire_index(hub)
    embed, extra = v1.tensors()["embed"], v1.tensors()["extra"]
    # an old version's objects vanish from the store: a plain one and a wire object
    object_file(hub / "lfs", embed.oid).unlink()
    object_file(hub / "lfs", index[extra.oid].wire.oid).unlink()
    assert "uploaded 0 objects" in git("potluck", "push", "origin")  # the tips look fine
    out = git("potluck", "push", "--verify", "origin", check=False)
    assert "uploaded 2 objects" in out
    assert "1 stale wire index entries re-sent as plain bytes" in out
    n = len(set(v1.oids()) | set(head_manifest(hub).oids()))
    assert f"holds all {n} objects the refs need" in out
    assert object_file(hub / "lfs", embed.oid).stat().st_size == embed.size
    assert object_file(hub / "lfs", extra.oid).stat().st_size == extra.size
    clone = tmp_path / "clone"
    run_in(tmp_path)("potluck", "clone", str(hub), str(clone))
    c = run_in(clone)
    c("git", "checkout", "-q", "HEAD~1")
    save_st(tmp_path / "v1.safetensors", m1)
    assert sha(clone / FILE) == sha(tmp_path / "v1.safetensors")
    assert json.loads(c("potluck", "status", "--json"))["not_materialized"] == []


# -- item 13: wire index entries that are wrong ------------------------------------------------


def test_index_entries_naming_missing_or_wrong_wire_objects_fall_back_to_plain(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m = pushed(git, repo, rng)
    t = m.tensors()
    embed, w0, w1 = t["embed"], t["layers.0.w"], t["layers.1.w"]
    set_index(
        hub,
        [
            WireEntry(embed.oid, ObjectRef(fake(1), 100), None),  # no such wire object
            WireEntry(w0.oid, ObjectRef(w1.oid, w1.size), None),  # another object's bytes
            WireEntry(w1.oid, ObjectRef(w0.oid, w0.size + 1), None),  # the wrong size
        ],
    )
    clone = tmp_path / "clone"
    out = run_in(tmp_path)("potluck", "clone", str(hub), str(clone), check=False)
    assert sha(clone / FILE) == sha(repo / FILE)
    for oid in (embed.oid, w0.oid, w1.oid):
        assert f"object {oid[:12]}: its wire index entry" in out
    assert "ok: all objects verified" in run_in(clone)("potluck", "fsck")


def test_a_3000_deep_index_chain_is_cut_then_the_plain_object_is_fetched_or_named(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator, tmp_path: Path
) -> None:
    m = pushed(git, repo, rng)
    embed = m.tensors()["embed"]
    chain = [embed.oid] + [fake(n) for n in range(1, 3000)]
    set_index(
        hub,
        [
            WireEntry(oid, ObjectRef(fake(10_000 + n), 64), chain[n + 1] if n < 2999 else None)
            for n, oid in enumerate(chain)
        ],
    )
    clone = tmp_path / "clone"
    out = run_in(tmp_path)("potluck", "clone", str(hub), str(clone), check=False)
    assert "RecursionError" not in out
    assert f"object {embed.oid[:12]}: its wire index entry" in out
    assert sha(clone / FILE) == sha(repo / FILE)
    # without the plain object either: a clear error naming file and tensor, the branch
    # checked out and the file left as its manifest
    object_file(hub / "lfs", embed.oid).unlink()
    other = tmp_path / "other"
    run_in(tmp_path)("potluck", "clone", "--no-data", str(hub), str(other))
    c = run_in(other)
    out = c("potluck", "pull", check=False)
    assert "Traceback" not in out
    assert f"1 object(s) missing on file://{hub}/lfs: {embed.oid}" in out
    assert f"first needed by {FILE}: tensor 'embed'" in out
    assert c("git", "symbolic-ref", "--short", "HEAD").strip() == "main"
    assert parse((other / FILE).read_bytes()) == m  # left as its manifest


def test_a_chain_of_sparse_edits_travels_as_deltas_on_verified_bases(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator
) -> None:
    """The verification must not cost the deltas: v2's base (v1) is on the remote only as a
    wire object, and v2 still travels as a small delta on it."""
    m = model(rng, d=128)
    embeds = []
    for i in range(3):
        commit_model(git, repo, m, f"v{i}")
        git("git", "push", "-q", "origin", "main")
        embeds.append(
            parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode()).tensors()["embed"]
        )
        m = {k: v.copy() for k, v in m.items()}
        flat = m["embed"].reshape(-1)
        flat[rng.choice(flat.size, flat.size // 100, replace=False)] += np.float32(0.01)
    index = wire_index(hub)
    for older, newer in itertools.pairwise(embeds):
        entry = index[newer.oid]
        assert entry.base == older.oid and entry.wire.size < newer.size // 10
    assert embeds[1].oid not in remote_objects(hub)  # v1 is there only as its delta
