"""The local store keeps what is still needed and heals what it can (issue 14, items 1, 3, 11):
gc keeps the objects of a `git add` still running, a torn or corrupt object is quarantined and
fetched again, a non-canonical manifest is named (path, blob, commits) and repaired in the work
tree, and `potluck fsck --repair` does all of it in one run."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from conftest import Run, run_in, save_st
from potluck.config import RepoConfig
from potluck.errors import CorruptObjectError, FormatError, UserError
from potluck.git import inspect as insp
from potluck.git import maintenance as maint
from potluck.git.repo import Repo
from potluck.objects.encoding import check_layout, encode_object
from potluck.objects.manifest import Manifest, RawEntry, dumps, parse, parse_lenient
from potluck.ops.vcs import ObjectDB
from potluck.ops.vcs.odb import SmallObject
from potluck.store import MemoryStore

FILE = "m.safetensors"
WEEK = 7 * 24 * 3600
BIN = Path(sys.executable).parent


def tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Two 256 KiB tensors and a small one (each its own object)."""
    return {
        "a": rng.normal(size=(256, 256)).astype(np.float32),
        "b": rng.normal(size=(256, 256)).astype(np.float32),
        "c": np.arange(64, dtype=np.float32),
    }


def store_root(repo: Path) -> Path:
    return repo / ".git" / "potluck" / "objects"


def obj_path(repo: Path, oid: str) -> Path:
    return store_root(repo) / oid[:2] / oid[2:]


def stored(repo: Path) -> set[str]:
    return {p.parent.name + p.name for p in store_root(repo).glob("??/*") if len(p.name) == 62}


def manifest_oids(git: Run, spec: str) -> set[str]:
    return set(parse(git("git", "cat-file", "blob", spec).encode()).oids())


def age(repo: Path, oids: set[str], seconds: float) -> None:
    """Make the objects look ``seconds`` old (their mtime is what gc's grace period reads)."""
    then = time.time() - seconds
    for oid in oids:
        os.utime(obj_path(repo, oid), (then, then))


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """Block until ``path`` exists (the filter reached its pause), failing if git exits first."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"git exited {proc.returncode} before the filter paused")
        if time.monotonic() > deadline:
            raise AssertionError("the filter never paused")
        time.sleep(0.02)


class PausedAdd:
    """`git add FILE` whose clean filter stores the objects, then pauses before git can write
    the blob and the index: the window in which gc sees the new objects unreferenced."""

    def __init__(self, repo: Path, tmp: Path) -> None:
        self.repo, self.ready, self.go = repo, tmp / "ready", tmp / "go"
        clean = (
            f"{shlex.quote(str(BIN / 'git-potluck'))} clean %f; rc=$?; "
            f"echo $rc > {shlex.quote(str(self.ready))}; "
            f"while [ ! -e {shlex.quote(str(self.go))} ]; do sleep 0.02; done; exit $rc"
        )
        self.clean = clean

    def __enter__(self) -> PausedAdd:
        # a single-shot clean filter: git prefers `process`, so that is unset during the add
        git = run_in(self.repo)
        self.process = git("git", "config", "filter.potluck.process").strip()
        git("git", "config", "--unset", "filter.potluck.process")
        self.proc = subprocess.Popen(
            ["git", "-c", f"filter.potluck.clean={self.clean}", "add", FILE],
            cwd=self.repo,
            stderr=subprocess.PIPE,
        )
        wait_for(self.ready, self.proc)
        assert self.ready.read_text().strip() == "0"
        return self

    def __exit__(self, *exc: object) -> None:
        self.go.touch()
        _, err = self.proc.communicate(timeout=60)
        run_in(self.repo)("git", "config", "filter.potluck.process", self.process)
        assert self.proc.returncode == 0, err.decode()


@pytest.fixture
def dropped_v1(repo: Path, git: Run, rng: np.random.Generator) -> Iterator[dict[str, object]]:
    """v1 committed, then dropped from every ref and reflog, its objects three weeks old."""
    t = tensors(rng)
    save_st(repo / FILE, t)
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", "v1")
    v1 = manifest_oids(git, f"HEAD:{FILE}")
    git("git", "reset", "-q", "--hard", "HEAD~1")
    git("git", "reflog", "expire", "--expire=now", "--all")
    age(repo, v1, 3 * WEEK)
    yield {"tensors": t, "v1": v1}


def test_gc_keeps_the_objects_of_a_git_add_still_running(
    repo: Path, git: Run, dropped_v1: dict[str, object], tmp_path: Path
) -> None:
    t = dict(dropped_v1["tensors"])  # type: ignore[call-overload]
    v1: set[str] = dropped_v1["v1"]  # type: ignore[assignment]
    t["b"] = t["b"] + 1  # a new object; "a", "c" and the header are the old, unreferenced ones
    data = save_st(repo / FILE, t)
    with PausedAdd(repo, tmp_path):
        rep = json.loads(git("potluck", "gc", "--json"))
    git("git", "commit", "-q", "-m", "v2")
    v2 = manifest_oids(git, f"HEAD:{FILE}")
    assert (rep["removed"], rep["kept"]) == (len(v1 - v2), len(v2))
    assert stored(repo) == v2
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data


def test_gc_dry_run_says_what_it_keeps_and_prune_now_removes_it(
    repo: Path, git: Run, dropped_v1: dict[str, object]
) -> None:
    v1: set[str] = dropped_v1["v1"]  # type: ignore[assignment]
    age(repo, v1, 3600)  # dropped an hour ago: inside the two-week grace period
    out = git("potluck", "gc", "-n")
    assert out.startswith(f"would remove 0 objects (0 B), kept {len(v1)}\n")
    assert f"kept {len(v1)} unreferenced objects" in out and "grace period 2.weeks.ago" in out
    git("git", "config", "potluck.pruneExpire", "30.minutes.ago")
    rep = maint.gc(Repo(repo), dry_run=True)
    assert (rep.removed, rep.recent, rep.expire["prune"]) == (len(v1), 0, "30.minutes.ago")
    assert stored(repo) == v1
    rep = maint.gc(Repo(repo), prune="never")
    assert (rep.removed, rep.recent, rep.expire["cutoff"]) == (0, len(v1), None)
    rep = json.loads(git("potluck", "gc", "--prune=now", "--json"))
    assert (rep["removed"], rep["kept"]) == (len(v1), 0) and stored(repo) == set()
    err = git("potluck", "gc", "--prune=2.wekks.ago", check=False)
    assert "potluck: error: invalid prune expiry '2.wekks.ago'" in err


def committed(repo: Path, git: Run, rng: np.random.Generator) -> tuple[bytes, dict[str, str]]:
    """The model committed; its bytes and the object id of each tensor."""
    data = save_st(repo / FILE, tensors(rng))
    git("git", "add", FILE)
    git("git", "commit", "-q", "-m", "v1")
    m = parse(git("git", "cat-file", "blob", f"HEAD:{FILE}").encode())
    return data, {n: e.oid for n, e in m.tensors().items()}


def damage(repo: Path, oid: str, *, tear: bool) -> bytes:
    """Cut the object file in half (torn) or flip one byte near its end; return the bytes."""
    p = obj_path(repo, oid)
    data = bytearray(p.read_bytes())
    if tear:
        data = data[: len(data) // 2]
    else:
        data[-10] ^= 0xFF
    p.chmod(0o644)
    p.write_bytes(bytes(data))
    return bytes(data)


def quarantined(repo: Path) -> dict[str, bytes]:
    qdir = store_root(repo) / "quarantine"
    return {p.name.split(".")[0]: p.read_bytes() for p in qdir.glob("*") if p.suffix != ".why"}


def test_torn_object_is_quarantined_and_fetched_again(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator
) -> None:
    data, oids = committed(repo, git, rng)
    git("git", "push", "-q", "origin", "main")
    torn = damage(repo, oids["a"], tear=True)
    out = git("potluck", "fetch")
    assert "fetched 1 objects (256.0 KiB), 3 already here" in out  # header, b, c are whole
    assert quarantined(repo) == {oids["a"]: torn}
    torn_b = damage(repo, oids["b"], tear=True)  # found by the checkout itself
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data
    assert quarantined(repo) == {oids["a"]: torn, oids["b"]: torn_b}


def stale_temp_files(repo: Path) -> list[Path]:
    """A leftover of an interrupted object write and of a download, two hours old."""
    files = [store_root(repo) / "tmp" / "0123-x.tmp", repo / ".git/potluck/tmp/incoming/y.part"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"partial")
        os.utime(f, (time.time() - 7200,) * 2)
    return files


def test_fsck_repair_quarantines_refetches_and_cleans(
    repo: Path, git: Run, hub: Path, rng: np.random.Generator
) -> None:
    data, oids = committed(repo, git, rng)
    git("git", "push", "-q", "origin", "main")
    flipped = damage(repo, oids["a"], tear=False)
    torn = damage(repo, oids["c"], tear=True)
    temp = stale_temp_files(repo)
    out = git("potluck", "fsck", check=False)
    assert f"corrupt object {oids['a'][:12]}: corrupt object: chunk 0 " in out
    assert f"corrupt object {oids['c'][:12]}: corrupt object: truncated chunk 0 payload" in out
    assert f"  used by {FILE} tensor a in " in out and out.endswith(
        "2 problems; `potluck fsck --repair` fixes what can be fixed here\n"
    )
    rep = json.loads(git("potluck", "fsck", "--repair", "--json"))
    assert (rep["healthy"], rep["temp_removed"], rep["left"], rep["quarantined"]) == (
        True, 2, [], 2,
    )  # fmt: skip
    assert [a["action"] for a in rep["actions"]] == ["quarantined"] * 2 + ["fetched"] * 2
    assert quarantined(repo) == {oids["a"]: flipped, oids["c"]: torn}
    assert not any(f.exists() for f in temp)
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data


def test_fsck_repair_without_a_copy_names_what_to_run(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    _, oids = committed(repo, git, rng)
    damage(repo, oids["b"], tear=False)
    Repo(repo).store.quarantine(oids["c"], "moved aside by a race")  # whole: it comes back
    r = subprocess.run(["potluck", "fsck", "--repair"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr
    oid = oids["b"]
    assert r.stdout.startswith(
        f"restored {oids['c'][:12]}: from quarantine\nquarantined {oid[:12]}: corrupt object: "
    )
    assert (
        f"missing object {oid[:12]}: object is not in the store\n  used by {FILE} tensor b in "
        in (r.stdout)
    )
    assert (
        f"  to repair: object {oid[:12]} ({FILE}, tensor b) is not on any remote this repair "
        "could reach: `potluck push <remote>` from a clone that has it, then `potluck fsck "
        f"--repair`; or copy .git/potluck/objects/{oid[:2]}/{oid[2:]} from such a clone\n"
    ) in r.stdout
    assert r.stdout.endswith("1 problems left\n")


def test_non_canonical_manifest_is_named_reported_and_repaired(
    repo: Path, git: Run, rng: np.random.Generator
) -> None:
    data, _ = committed(repo, git, rng)
    canonical = git("git", "cat-file", "blob", f"HEAD:{FILE}").encode()
    lines = canonical.split(b"\n")
    lines[2] = lines[2].replace(b'"size":', b'"size": ')  # one extra space
    bad = b"\n".join(lines)
    blob = git("git", "hash-object", "-w", "--no-filters", "--stdin", input=bad).strip()
    git("git", "update-index", "--cacheinfo", f"100644,{blob},{FILE}")
    git("git", "commit", "-q", "-m", "damaged")
    commit = git("git", "rev-parse", "HEAD").strip()
    what = f"manifest is not in canonical form (line 3 is {lines[2][:80]!r}, canonical "
    (repo / FILE).unlink()
    err = git("git", "checkout", "--", FILE, check=False)
    assert f"{FILE}: {what}" in err
    with pytest.raises(FormatError) as e:
        insp.du(Repo(repo))
    assert str(e.value).startswith(f"{FILE} (blob {blob[:12]}), {commit[:10]}: {what}")
    assert "\nhint: `potluck fsck` lists them" in str(e.value)
    with pytest.raises(FormatError, match=re.escape(f"HEAD:{FILE}: {what}")):
        insp.diff(Repo(repo), "HEAD~1", "HEAD", [], stats=False)
    rep = maint.gc(Repo(repo), dry_run=True)
    assert (rep.damaged, rep.removed) == ([f"{FILE} (blob {blob[:12]})"], 0)
    r = subprocess.run(["potluck", "fsck"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == ""
    assert f"bad-manifest blob {blob[:12]}: {FILE} (blob {blob[:12]}): {what}" in r.stdout
    assert f"  used by {FILE} in {commit[:10]}\n  to repair: `potluck fsck --repair`" in r.stdout
    r = subprocess.run(["potluck", "fsck", "--repair"], cwd=repo, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr == ""
    assert f"rewrote {FILE}: manifest in canonical form (work tree)" in r.stdout
    assert f"`git add --renormalize -- {FILE} && git commit`" in r.stdout
    assert (repo / FILE).read_bytes() == canonical
    git("git", "add", "--renormalize", "--", FILE)
    git("git", "commit", "-q", "-m", "canonical manifest")
    (repo / FILE).unlink()
    git("git", "checkout", "--", FILE)
    assert (repo / FILE).read_bytes() == data
    out = git("potluck", "fsck")
    assert f"note: {FILE} (blob {blob[:12]}): {what}" in out and f"in {commit[:10]}: " in out
    assert out.endswith("ok: all objects verified\n")
    good = git("git", "rev-parse", "HEAD").strip()
    unreadable = canonical.replace(b'{"raw"', b'{"raw" oops', 1)
    blob = git("git", "hash-object", "-w", "--no-filters", "--stdin", input=unreadable).strip()
    git("git", "update-index", "--cacheinfo", f"100644,{blob},{FILE}")
    git("git", "commit", "-q", "-m", "unreadable")
    (p,) = [p for p in maint.fsck(Repo(repo), rehash=False) if p.bad]
    assert (p.kind, p.detail) == (
        maint.BAD_MANIFEST,
        f"{FILE} (blob {blob[:12]}): manifest is malformed on line 3: Expecting ':' delimiter: "
        "line 1 column 8 (char 7)",
    )
    assert p.repair == (
        f"cannot be read: restore the last readable version with `git checkout {good[:10]} -- "
        f"{FILE}` (or put the checkpoint at {FILE}), then `git add -- {FILE} && git commit`"
    )


# --- the cheap checks, without git --------------------------------------------------------------


def _object(chunks: int) -> bytes:
    """An object of ``chunks`` chunks of 4 KiB: raw, grouped and identical-to-base kinds."""
    data = np.arange(chunks * 1024, dtype=np.float32)
    data[: len(data) // 2] = 0  # compressible half
    out = io.BytesIO()
    encode_object([data.tobytes()], size=data.nbytes, itemsize=4, chunk_size=4096, level=1, out=out)
    return out.getvalue()


@pytest.mark.parametrize("chunks", [1, 3])
def test_check_layout_finds_every_torn_length_and_trailing_bytes(chunks: int) -> None:
    blob = _object(chunks)
    assert check_layout(io.BytesIO(blob), len(blob)).n_chunks == chunks
    for keep in range(len(blob)):  # every truncation, at record boundaries too
        with pytest.raises(CorruptObjectError):
            check_layout(io.BytesIO(blob[:keep]), keep)
    with pytest.raises(CorruptObjectError, match="3 trailing bytes after the last chunk"):
        check_layout(io.BytesIO(blob + b"xyz"), len(blob) + 3)


def test_odb_has_quarantines_a_torn_object_and_put_writes_it_again() -> None:
    odb = ObjectDB(MemoryStore(), RepoConfig(chunk_bytes=4096), workers=1)
    data = np.arange(3000, dtype=np.float32).tobytes()
    oid = odb.put_bytes(data, itemsize=4).oid
    odb2 = ObjectDB(odb.store, odb.config, workers=1)  # another process: nothing checked yet
    whole = odb.store._objects[oid]  # type: ignore[attr-defined]
    odb.store._objects[oid] = whole[:-1]  # type: ignore[attr-defined]
    assert not odb2.has(oid) and not odb.store.has(oid)
    (q,) = odb.store.quarantined()
    assert (q.oid, q.reason) == (
        oid,
        f"corrupt object: torn: the file ends at byte {len(whole) - 1}, inside chunk 2",
    )
    assert odb2.put_bytes(data, itemsize=4).new and odb2.read_bytes(oid) == data


@pytest.mark.parametrize("packed", [False, True])
def test_odb_has_many_is_has_of_each_and_quarantines_a_torn_object(
    tmp_path: Path, packed: bool
) -> None:
    """``ObjectDB.has_many`` (one look at the store for all ids) answers what ``has`` of each
    answers in a fresh process: absent ids and a torn object are left out, the torn one is
    quarantined, repeated ids count once; loose and packed objects alike."""
    from potluck.store.local import LocalStore

    config = RepoConfig(chunk_bytes=4096)
    odb = ObjectDB(LocalStore(tmp_path / "s", pack_min=1), config, workers=1)
    datas = [np.full(300 + 50 * i, i, np.float32).tobytes() for i in range(6)]
    items = [SmallObject(hashlib.sha256(d).hexdigest(), d, 4) for d in datas]
    with odb.store.batch() if packed else contextlib.nullcontext():
        oids = [r.oid for r in odb.put_small_many(items, durable=not packed)]
    assert bool(odb.store.packs.packs) == packed  # type: ignore[attr-defined]
    torn = oids[2]
    with odb.store.open(torn) as f:
        whole = f.read()
    odb.store.delete(torn)
    with odb.store.writer(torn) as w:
        w.write(whole[:-1])
    absent = "0" * 64
    asked = [*oids, absent, oids[0]]
    fresh, reference = (ObjectDB(odb.store, config, workers=1) for _ in range(2))
    expected = {oid for oid in asked if reference.has(oid)}
    assert expected == set(oids) - {torn}
    for q in odb.store.quarantined():  # put back: ``has_many`` must find it torn by itself
        odb.store.delete(q.oid)
    with odb.store.writer(torn) as w:
        w.write(whole[:-1])
    assert fresh.has_many(asked) == expected
    assert [q.oid for q in odb.store.quarantined()].count(torn) == 2


def test_damaged_manifest_text_is_read_leniently_or_salvaged() -> None:
    a, b = "a" * 64, "b" * 64
    good = dumps(Manifest("npz", 8, (RawEntry(a, 4), RawEntry(b, 4))))
    spaced = good.replace(b'"size":4', b'"size": 4')
    with pytest.raises(FormatError, match=r"^x\.npz: manifest is not in canonical form \(line 3"):
        parse(spaced, "x.npz")
    assert parse_lenient(spaced) == parse(good)
    damaged = maint.read_damaged("0" * 40, "x.npz", spaced)
    assert damaged is not None and damaged.manifest == parse(good)
    garbage = good.replace(b'{"raw"', b'{"raw" oops', 1)
    with pytest.raises(FormatError, match=r"^x\.npz: manifest is malformed on line 3: "):
        parse_lenient(garbage, "x.npz")
    damaged = maint.read_damaged("0" * 40, "x.npz", garbage)
    assert damaged is not None and (damaged.manifest, damaged.oids) == (None, {a, b})


def test_prune_cutoff() -> None:
    now = 1_700_000_000.0
    assert maint.prune_cutoff("now", now) == now
    assert maint.prune_cutoff("never", now) is None
    assert maint.prune_cutoff("2.weeks.ago", now) == now - 2 * WEEK
    assert maint.prune_cutoff("90 minutes ago", now) == now - 5400
    assert maint.prune_cutoff("1.hour.ago", now) == now - 3600
    with pytest.raises(UserError, match=r"invalid prune expiry '2\.wekks\.ago'"):
        maint.prune_cutoff("2.wekks.ago", now)


class _GcBetweenHasAndFreshen(MemoryStore):
    """A store where another process's gc removes an object right after ``has`` saw it: the
    window between a put's presence check and its freshen."""

    def __init__(self) -> None:
        super().__init__()
        self.collect: set[str] = set()

    def freshen(self, oid: str) -> bool:
        if oid in self.collect:
            self.collect.discard(oid)
            self.delete(oid)
        return super().freshen(oid)


def test_put_writes_again_an_object_gc_removed_after_it_was_found() -> None:
    """Issue 14: ``put`` found the object, gc removed it before ``freshen``; the put reported
    it as present and the manifest referred to a missing object."""
    store = _GcBetweenHasAndFreshen()
    db = ObjectDB(store, RepoConfig(), workers=1)
    data = np.arange(300, dtype=np.float32).tobytes()
    oid = db.put_bytes(data, itemsize=4).oid
    store.collect.add(oid)
    again = db.put_bytes(data, itemsize=4)
    assert again.new and store.has(oid)
    assert db.read_bytes(oid) == data
