"""Push to and clone from one loopback Git LFS server: potluck against plain git-lfs.

One giftless server runs in a thread of this process. Each tool gets its own bare git
repository on the local file system, its own LFS endpoint on that server (a different
org/repo, so objects do not mix) and its own HOME. The checkpoint history of bench.vcs
(v1..v5, ``bench.common.checkpoints``) is committed and pushed one version at a time, then the
final history is cloned into a new directory and checked byte for byte against v5. See
bench/README.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from bench.common import checkpoints, measure, paths, tools
from testsupport.servers import LfsServer  # giftless on loopback

TOOL_NAMES = ("potluck", "git-lfs")
SIZE_ALIASES = {"medium": "gpt2"}
LFSCONFIG = ".lfsconfig"
LFS_ORG = "bench"
CLONE_DIR = "clone"
PUSH = ["git", "push", "-q", "origin", "main"]


# --------------------------------------------------------------------------- the server


def serve_in_blocks(block: int = 1 << 20) -> None:
    """Make giftless send stored objects in ``block``-byte pieces.

    giftless (0.6.2, basic_streaming + LocalStorage) answers a download with the open file as
    the response iterable, so it is sent line by line: for float data a "line" averages ~256
    bytes and the server tops out at ~11 MB/s here, which would make every clone measure the
    server instead of the client. With 1 MiB blocks the same server sends ~1.2 GB/s.
    """
    import giftless.app  # noqa: F401  (giftless.view must be imported before the storage)
    from giftless.storage import local_storage
    from werkzeug.wsgi import FileWrapper

    get = local_storage.LocalStorage.get

    def get_in_blocks(self: Any, prefix: str, oid: str) -> BinaryIO:
        return FileWrapper(get(self, prefix, oid), block)  # type: ignore[return-value]

    local_storage.LocalStorage.get = get_in_blocks  # type: ignore[method-assign]


# --------------------------------------------------------------------------- results


@dataclasses.dataclass
class Transfer:
    """One measured push or clone: wall seconds and what the LFS server saw."""

    label: str
    wall_s: float
    nbytes: int  # object bytes the server received (PUT bodies) or sent (GET bodies)
    requests: int
    cpu_s: float = 0.0  # user+sys CPU of the client processes (git, hooks, potluck / git-lfs)
    server_cpu_s: float = 0.0  # user+sys CPU of this process (the LFS server's threads)


@dataclasses.dataclass
class RemoteRun:
    tool: str
    pushes: list[Transfer] = dataclasses.field(default_factory=list)
    clone: Transfer | None = None
    skipped: str = ""
    error: str = ""

    def pushed_bytes(self) -> int:
        return sum(p.nbytes for p in self.pushes)

    def push_wall(self) -> float:
        return sum(p.wall_s for p in self.pushes)


# --------------------------------------------------------------------------- one tool


def measured(server: LfsServer, label: str, action: Callable[[], object], sent: bool) -> Transfer:
    """Run action with zeroed server counters; sent: count bytes the server sent."""
    server.reset_counters()
    c0, s0 = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    action()
    wall = time.perf_counter() - t0
    cpu, server_cpu = _cpu(resource.RUSAGE_CHILDREN) - c0, _cpu(resource.RUSAGE_SELF) - s0
    nbytes = server.bytes_sent if sent else server.bytes_received
    return Transfer(label, wall, nbytes, len(server.requests), cpu, server_cpu)


def _cpu(who: int) -> float:
    """User + system CPU seconds of this process or of its waited-for children."""
    use = resource.getrusage(who)
    return use.ru_utime + use.ru_stime


def prepare(repo: tools.Repo, bare: Path, url: str) -> None:
    """Work repo set up for the tool (Repo.setup), a bare origin and the LFS endpoint."""
    if repo.tool.name == "git-lfs":
        repo.git_identity()
        repo.check(["git", "lfs", "install", "--skip-repo"])  # filters for the clone side
    repo.setup()
    repo.check(["git", "init", "-q", "--bare", str(bare)])
    repo.check(["git", "remote", "add", "origin", str(bare)])
    repo.check(["git", "config", "lfs.url", url])
    repo.check(["git", "config", "-f", LFSCONFIG, "lfs.url", url])


def push_history(
    repo: tools.Repo, server: LfsServer, versions: list[checkpoints.Version], run: RemoteRun
) -> None:
    """Commit v1..v5 (v1 with .lfsconfig), pushing after each commit."""
    for n, version in enumerate(versions, 1):
        shutil.copyfile(version.path, repo.path / checkpoints.CKPT)
        repo.check(["git", "add", checkpoints.CKPT, LFSCONFIG])
        repo.check(["git", "commit", "-q", "-m", f"v{n}"])
        run.pushes.append(measured(server, version.label, lambda: repo.check(PUSH), sent=False))


def clone_command(tool: str, bare: Path, dest: Path) -> list[str]:
    if tool == "potluck":
        return ["potluck", "clone", str(bare), str(dest)]
    return ["git", "clone", "-q", str(bare), str(dest)]


def clone_history(
    repo: tools.Repo, server: LfsServer, bare: Path, want: checkpoints.Version, run: RemoteRun
) -> None:
    """Full clone of the bare repo next to the work repo; the checkpoint must equal v5."""
    root = repo.path.parent
    dest = root / CLONE_DIR
    cmd = clone_command(run.tool, bare, dest)

    def action() -> None:
        rc, _ = measure.run_command(cmd, root, repo.env, repo.timeout, repo.log)
        if rc != 0:
            raise measure.CommandError(
                f"`{' '.join(cmd)}` exited {rc}:\n{measure.log_tail(repo.log)}"
            )

    run.clone = measured(server, "full clone", action, sent=True)
    got = dest / checkpoints.CKPT
    if not got.is_file():
        raise measure.CommandError(f"clone: {checkpoints.CKPT} missing in {dest}")
    digest = checkpoints.file_sha256(got)
    if digest != want.sha256:
        raise measure.CommandError(
            f"clone: {checkpoints.CKPT} differs from v5 "
            f"(sha256 {digest[:16]}…, want {want.sha256[:16]}…)"
        )


def run_tool(
    name: str, server: LfsServer, versions: list[checkpoints.Version], args: argparse.Namespace
) -> RemoteRun:
    run = RemoteRun(name)
    with measure.scratch(f"remote-{name}-", args.workdir, args.keep) as root:
        try:
            repo = tools.Repo(tools.TOOLS[name], root, args.threads, args.timeout)
            repo.env["GIT_TERMINAL_PROMPT"] = "0"  # never wait for a password
            if name == "potluck" and args.potluck_src is not None:
                repo.env["PYTHONPATH"] = str(args.potluck_src)  # before/after comparisons
            bare = root / "origin.git"
            # giftless makes a repository's directory on its first PUT, racily: parallel
            # first uploads (potluck's) failed with 500 and were retried. Make it up front.
            (server.storage / LFS_ORG / name).mkdir(parents=True, exist_ok=True)
            prepare(repo, bare, server.url_for(LFS_ORG, name))
            push_history(repo, server, versions, run)
            clone_history(repo, server, bare, versions[-1], run)
        except measure.CommandError as exc:
            run.error = str(exc)
    return run


# --------------------------------------------------------------------------- report


def transfer_cells(t: Transfer | None) -> list[str]:
    if t is None:
        return ["-"] * 5
    return [
        measure.fmt(t.nbytes / checkpoints.MB, ".1f"),
        measure.fmt(t.wall_s, ".2f"),
        measure.fmt(t.cpu_s, ".2f"),
        measure.fmt(t.server_cpu_s, ".2f"),
        str(t.requests),
    ]


def find_push(run: RemoteRun, label: str) -> Transfer | None:
    return next((p for p in run.pushes if p.label == label), None)


def total_push(run: RemoteRun) -> Transfer | None:
    if not run.pushes:
        return None
    requests = sum(p.requests for p in run.pushes)
    cpu = sum(p.cpu_s for p in run.pushes)
    server_cpu = sum(p.server_cpu_s for p in run.pushes)
    return Transfer("total", run.push_wall(), run.pushed_bytes(), requests, cpu, server_cpu)


def results_table(runs: list[RemoteRun], versions: list[checkpoints.Version]) -> str:
    top = ["step"] + [c for r in runs for c in [r.tool, "", "", "", ""]]
    sub = [""] + ["MB", "wall s", "cpu s", "srv cpu", "reqs"] * len(runs)
    rows = [
        [f"push {v.label}"] + [c for r in runs for c in transfer_cells(find_push(r, v.label))]
        for v in versions
    ]
    rows.append(["push total"] + [c for r in runs for c in transfer_cells(total_push(r))])
    rows.append(["full clone (download)"] + [c for r in runs for c in transfer_cells(r.clone)])
    return measure.render_table(rows, [top, sub])


@dataclasses.dataclass
class Ratio:
    name: str
    limit: float | None  # None: for information only
    value: float | None

    def verdict(self) -> str:
        if self.limit is None:
            return "info"
        if self.value is None:
            return "n/a"
        return "PASS" if self.value <= self.limit else "FAIL"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den > 0:
        return None
    return num / den


def push_ratio(pot: RemoteRun, lfs: RemoteRun, label: str, wall: bool) -> float | None:
    a, b = find_push(pot, label), find_push(lfs, label)
    if a is None or b is None:
        return None
    return ratio(a.wall_s, b.wall_s) if wall else ratio(a.nbytes, b.nbytes)


def cpu_ratio(a: Transfer | None, b: Transfer | None) -> float | None:
    return None if a is None or b is None else ratio(a.cpu_s, b.cpu_s)


def clone_ratio(pot: RemoteRun, lfs: RemoteRun, wall: bool) -> float | None:
    a, b = pot.clone, lfs.clone
    if a is None or b is None:
        return None
    return ratio(a.wall_s, b.wall_s) if wall else ratio(a.nbytes, b.nbytes)


def complete(run: RemoteRun) -> bool:
    return not run.skipped and not run.error


def evaluate(runs: list[RemoteRun], versions: list[checkpoints.Version]) -> list[Ratio]:
    pot, lfs = (next(r for r in runs if r.tool == name) for name in TOOL_NAMES)
    if not (complete(pot) and complete(lfs)):
        pot, lfs = RemoteRun("potluck"), RemoteRun("git-lfs")  # no ratios from partial runs
    v1 = versions[0].label
    first_lfs = find_push(lfs, v1)
    v3 = versions[2].label if len(versions) > 2 else ""
    rows = [
        Ratio("upload after v3 (1%-sparse), bytes", 0.02, push_ratio(pot, lfs, v3, False)),
        Ratio("first push (v1) wall", 1.2, push_ratio(pot, lfs, v1, True)),
        Ratio("full clone wall", 1.0, clone_ratio(pot, lfs, True)),
        Ratio("first push (v1) client CPU", None, cpu_ratio(find_push(pot, v1), first_lfs)),
        Ratio("full clone client CPU", None, cpu_ratio(pot.clone, lfs.clone)),
    ]
    for label in (v.label for v in versions if v.label != v3):
        rows.append(Ratio(f"upload {label}, bytes", None, push_ratio(pot, lfs, label, False)))
    total = ratio(pot.pushed_bytes(), lfs.pushed_bytes()) if pot.pushes else None
    rows.append(Ratio("upload total v1..v5, bytes", None, total))
    for v in versions:
        rows.append(Ratio(f"push wall {v.label}", None, push_ratio(pot, lfs, v.label, True)))
    wall = ratio(pot.push_wall(), lfs.push_wall()) if pot.pushes else None
    rows.append(Ratio("push wall total v1..v5", None, wall))
    rows.append(Ratio("full clone, bytes downloaded", None, clone_ratio(pot, lfs, False)))
    return rows


def ratios_table(rows: list[Ratio]) -> str:
    body = [
        [
            r.name,
            "-" if r.limit is None else f"<= {r.limit:g}",
            measure.fmt(math.nan if r.value is None else r.value, ".4f"),
            r.verdict(),
        ]
        for r in rows
    ]
    return measure.render_table(body, [["potluck / git-lfs", "limit", "ratio", "result"]])


def print_problems(runs: list[RemoteRun]) -> None:
    for run in runs:
        if run.skipped:
            print(f"! {run.tool}: skipped: {run.skipped}")
        if run.error:
            print(f"! {run.tool} FAILED:\n    {measure.error_tail(run.error, 12)}")


# --------------------------------------------------------------------------- main


def tool_versions() -> dict[str, str]:
    return {
        "git": measure.capture(["git", "--version"]),
        "git-lfs": measure.capture(["git", "lfs", "version"]),
        "potluck": measure.capture([str(paths.POTLUCK_BIN / "potluck"), "--version"]),
        "giftless": importlib.metadata.version("giftless"),
    }


def print_header(args: argparse.Namespace) -> None:
    print(f"# potluck remote benchmark: size={args.size} dtype={args.dtype}")
    print(f"# threads fixed to {args.threads} for both tools (see 'threads' below)")
    sending = "line by line (stock)" if args.stock_downloads else "in 1 MiB blocks"
    print("# one giftless LFS server (werkzeug, threaded) in this process on 127.0.0.1,")
    print(f"# sending objects {sending} (see serve_in_blocks);")
    print("# bare git repos on the local file system; MB = 10^6 object bytes the server")
    print("# received (PUT bodies, push) or sent (GET bodies, clone); batch JSON not counted")
    for key, value in {**measure.machine_info(args.threads), **tool_versions()}.items():
        print(f"#   {key:<22} {value}")
    print()


def bench(args: argparse.Namespace, skips: dict[str, str]) -> list[RemoteRun]:
    ckpt_dir = Path(tempfile.mkdtemp(prefix="remote-ckpt-", dir=args.workdir))
    store = Path(tempfile.mkdtemp(prefix="remote-lfs-", dir=args.workdir))
    try:
        versions = checkpoints.build_history(
            SIZE_ALIASES.get(args.size, args.size), args.dtype, ckpt_dir
        )[: args.versions]
        checkpoints.describe_history(args.dtype, versions)
        runs: list[RemoteRun] = []
        with LfsServer(store) as server:
            for name in TOOL_NAMES:
                if name in skips:
                    runs.append(RemoteRun(name, skipped=skips[name]))
                    continue
                print(f"  running {name} ...", file=sys.stderr, flush=True)
                runs.append(run_tool(name, server, versions, args))
        print(results_table(runs, versions))
        print("  reqs = HTTP requests the LFS server answered during the step")
        print_problems(runs)
        print()
        print(ratios_table(evaluate(runs, versions)))
    finally:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__)
    sizes = sorted([*checkpoints.SIZES, *SIZE_ALIASES])
    p.add_argument("--size", choices=sizes, default="gpt2", help="medium = gpt2 (~498 MB f32)")
    p.add_argument("--dtype", choices=sorted(checkpoints.DTYPES), default="f32")
    p.add_argument(
        "--versions",
        type=int,
        choices=range(1, 6),
        default=5,
        help="push only v1..vN, then clone vN (1: first push and clone alone)",
    )
    p.add_argument(
        "--potluck-src",
        type=Path,
        help="run potluck from this source tree (PYTHONPATH; e.g. a `git archive` of an older "
        "commit's src/) to compare before and after a change in one session",
    )
    p.add_argument("--threads", type=int, default=2, help="thread count forced on both tools")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per git command")
    p.add_argument("--workdir", type=Path, help="parent of the temp dirs (default: system tmp)")
    p.add_argument("--keep", action="store_true", help="keep the temp repositories")
    p.add_argument(
        "--stock-downloads",
        action="store_true",
        help="let giftless send objects line by line as it does (~11 MB/s, server-bound clones)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(measure.thread_env(args.threads))
    if not args.stock_downloads:
        serve_in_blocks()
    skips = {
        name: msg
        for name in TOOL_NAMES
        if (msg := tools.probe_tool(tools.TOOLS[name], args.threads)) is not None
    }
    print_header(args)
    runs = bench(args, skips)
    return 0 if all(complete(r) for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
