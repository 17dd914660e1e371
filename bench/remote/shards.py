"""Clone of a model in N safetensors shards through one loopback Git LFS server: the filter
process fetching each shard when git asks for it (``potluck.delayCheckout=false``, the
behaviour before delayed checkout) against delayed checkout (one download batch for all).

    .venv/bin/python -m bench.remote.shards [--shards 8] [--shard-mb 16] [--repeat 1]

``--latency`` makes the server wait that long before each answer (a remote's round trip).
Prints wall time, client CPU (git and potluck processes), the LFS server's requests (batch
POSTs and object GETs) and bytes sent, for each mode; each clone is checked byte for byte.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import measure, paths
from testsupport.servers import LfsServer

MODES = {"per-file (before)": "false", "delayed (after)": "true"}


def _cpu_children() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def _env(root: Path, delay: str | None = None) -> dict[str, str]:
    env = dict(os.environ, HOME=str(root / "home"), GIT_TERMINAL_PROMPT="0")
    env["PATH"] = f"{paths.POTLUCK_BIN}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@x", GIT_COMMITTER_NAME="b")
    env["GIT_COMMITTER_EMAIL"] = "b@x"
    if delay is not None:
        env.update(GIT_CONFIG_COUNT="1", GIT_CONFIG_KEY_0="potluck.delayCheckout")
        env["GIT_CONFIG_VALUE_0"] = delay
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float) -> None:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise measure.CommandError(
            f"`{' '.join(cmd)}` exited {r.returncode}:\n{r.stderr[-2000:]!r}"
        )


def make_shards(repo: Path, shards: int, shard_mb: int) -> dict[str, str]:
    """Write the shards (4 float32 tensors each); return {name: sha256}."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    per = shard_mb * (1 << 20) // 4 // 4  # elements per tensor
    out: dict[str, str] = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.w{j}": rng.standard_normal(per, dtype=np.float32) for j in range(4)}
        save_file(tensors, str(repo / name))
        out[name] = hashlib.sha256((repo / name).read_bytes()).hexdigest()
    return out


def publish(root: Path, server: LfsServer, args: argparse.Namespace) -> tuple[Path, dict[str, str]]:
    """A repository with the shards committed and pushed to a bare origin on ``server``."""
    repo, bare, env = root / "repo", root / "hub.git", _env(root)
    (root / "home").mkdir()
    repo.mkdir()
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["potluck", "init"],
        ["potluck", "track", "*.safetensors"],
        ["git", "init", "-q", "--bare", "-b", "main", str(bare)],
        ["git", "remote", "add", "origin", str(bare)],
    ):
        _run(cmd, repo, env, args.timeout)
    (repo / ".lfsconfig").write_text(f'[lfs]\n\turl = "{server.url}"\n')
    digests = make_shards(repo, args.shards, args.shard_mb)
    _run(["git", "add", "-A"], repo, env, args.timeout)
    _run(["git", "commit", "-q", "-m", "shards"], repo, env, args.timeout)
    _run(["git", "push", "-q", "origin", "main"], repo, env, args.timeout)
    return bare, digests


def clone_once(
    root: Path, bare: Path, server: LfsServer, delay: str, digests: dict[str, str], timeout: float
) -> list[str]:
    """One measured clone; the table cells of its row."""
    dest = root / f"clone-{time.monotonic_ns()}"
    server.reset_counters()
    c0, t0 = _cpu_children(), time.perf_counter()
    _run(["potluck", "clone", str(bare), str(dest)], root, _env(root, delay), timeout)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    for name, digest in digests.items():
        if hashlib.sha256((dest / name).read_bytes()).hexdigest() != digest:
            raise measure.CommandError(f"{dest / name} differs from the pushed shard")
    posts = [p for p in server.paths("POST") if p.endswith("/objects/batch")]
    row = [f"{wall:.2f}", f"{cpu:.2f}", str(len(posts)), str(len(server.paths("GET")))]
    row += [str(len(server.requests)), f"{server.bytes_sent / 1e6:.1f}"]
    subprocess.run(["rm", "-rf", str(dest)], check=False)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--shard-mb", type=int, default=16)
    p.add_argument("--repeat", type=int, default=1, help="clones per mode (alternating)")
    p.add_argument(
        "--latency", type=float, default=0.0, help="seconds the server waits per request (RTT)"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per command")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args(argv)
    print(
        f"# bench.remote.shards: {args.shards} shards x {args.shard_mb} MB, "
        f"{args.latency * 1000:.0f} ms per request; uptime:"
    )
    print("# " + measure.capture(["uptime"]).strip())
    rows: list[list[str]] = []
    with (
        measure.scratch("shards-", args.workdir, args.keep) as root,
        LfsServer(root / "lfs") as server,
    ):
        bare, digests = publish(root, server, args)
        if args.latency:
            server.chaos(0, rate=0.0, delay=args.latency)  # no faults, only the wait
        for _ in range(args.repeat):
            for label, delay in MODES.items():
                rows.append([label, *clone_once(root, bare, server, delay, digests, args.timeout)])
    header = [["clone", "wall s", "client CPU s", "batch POSTs", "GETs", "requests", "MB sent"]]
    print(measure.render_table(rows, header))
    print("# " + measure.capture(["uptime"]).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
