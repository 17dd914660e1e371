"""Load test of ``potluck hub``: the diff page of a large checkpoint, once indexed.

Run from the repository root: ``.venv/bin/python -m bench.hub`` (``--help`` for options).

A GPT-2-shaped float32 checkpoint (``--size gpt2``: 124 M parameters, ~500 MB) is committed with
potluck twice (v2 = the sparse update of bench.common.checkpoints: 1 % of four matrices, plus a
dense update of every tensor with ``--dense``). ``potluck hub`` (the real CLI, one uvicorn
process) indexes it at start (timed), then ``--requests`` GETs of v2's commit page (the per-tensor
diff table and heat map) are sent over ``--connections`` keep-alive connections with httpx;
p50 / p99 latency and errors are printed with the load average. Target: p99 ≤ 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.common.checkpoints import (
    DTYPES,
    SEED,
    SIZES,
    dense_update,
    gpt2_shapes,
    initial_state,
    sparse_update,
)
from bench.common.measure import scratch
from bench.common.paths import POTLUCK_BIN

TARGET_P99_MS = 200.0


def _sh(cwd: Path, env: dict[str, str], *args: str) -> str:
    r = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r.stdout.strip()


def build_repo(root: Path, size: str, dense: bool, env: dict[str, str]) -> tuple[str, int]:
    """Commit v1 and v2 of the checkpoint; returns v2's commit and the file's size."""
    from safetensors.numpy import save_file

    repo = root / "bench"
    repo.mkdir()
    for cmd in (
        ["git", "init", "-q", "-b", "main"],
        ["potluck", "init"],
        ["potluck", "track", "*.safetensors"],
        ["git", "add", ".gitattributes"],
        ["git", "commit", "-q", "-m", "track"],
    ):
        _sh(repo, env, *cmd)
    rng = np.random.default_rng(SEED)
    sd = initial_state(gpt2_shapes(*SIZES[size]), DTYPES["f32"], rng)
    for label in ("v1", "v2"):
        if label == "v2":
            sparse_update(sd, rng)
            if dense:
                dense_update(sd, rng)
        save_file(sd, str(repo / "model.safetensors"))
        _sh(repo, env, "git", "add", "model.safetensors")
        _sh(repo, env, "git", "commit", "-q", "-m", f"{label} of the checkpoint")
    return _sh(repo, env, "git", "rev-parse", "HEAD"), (repo / "model.safetensors").stat().st_size


async def _load(url: str, requests: int, connections: int) -> tuple[list[float], int]:
    import httpx

    latencies: list[float] = []
    errors = 0
    left = iter(range(requests))
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:

        async def worker() -> None:
            nonlocal errors
            for _ in left:
                t0 = time.perf_counter()
                try:
                    r = await client.get(url)
                    ok = r.status_code == 200 and b"heatmap" in r.content
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

        await asyncio.gather(*(worker() for _ in range(connections)))
    return latencies, errors


def _first_tensor_pages(base: str) -> list[tuple[str, float]]:
    """Seconds of the first (uncached) tensor page of a changed matrix and of the embedding."""
    import httpx

    out = []
    for name in ("h.0.attn.c_attn.weight", "wte.weight"):
        t0 = time.perf_counter()
        r = httpx.get(
            f"{base}/r/bench/tensor",
            params={"rev": "main", "path": "model.safetensors", "name": name},
            timeout=300,
        )
        if r.status_code != 200:
            raise SystemExit(f"tensor page of {name}: HTTP {r.status_code}")
        out.append((name, time.perf_counter() - t0))
    return out


def _peak_rss_mb(pid: int) -> float:
    """Peak resident memory of process ``pid`` (VmHWM), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(base: str, proc: subprocess.Popen[bytes], limit_s: float) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"potluck hub exited with {proc.returncode}")
        try:
            if httpx.get(base + "/api/", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"potluck hub did not answer within {limit_s:.0f} s")


def _ab(url: str, requests: int, connections: int) -> tuple[float, float, int] | None:
    """p50 and p99 (ms) and failed requests from ApacheBench (Debian's apache2-utils), a load
    generator in C: the httpx client above is Python on the same 2 cores and its own latency
    dominates. None when ``ab`` is not installed."""
    if shutil.which("ab") is None:
        return None
    out = subprocess.run(
        ["ab", "-q", "-k", "-n", str(requests), "-c", str(connections), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    pct = dict(re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M))
    failed = int(re.search(r"^Failed requests:\s+(\d+)", out, re.M).group(1))  # type: ignore[union-attr]
    return float(pct["50"]), float(pct["99"]), failed


def run(args: argparse.Namespace, root: Path) -> int:
    """Build, serve, load; print the numbers; exit status 0 when the target is met."""
    env = dict(
        os.environ,
        PATH=f"{POTLUCK_BIN}{os.pathsep}{os.environ['PATH']}",
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@potluck.invalid",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@potluck.invalid",
    )
    t0 = time.perf_counter()
    head, size = build_repo(root, args.size, args.dense, env)
    print(f"checkpoint {size / 1e6:.0f} MB, two commits in {time.perf_counter() - t0:.1f} s")
    port = _port()
    cmd = [
        str(POTLUCK_BIN / "potluck"),
        "hub",
        str(root / "bench"),
        "--port",
        str(port),
        "--db",
        f"sqlite:///{root / 'hub.sqlite'}",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=sys.stderr)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(base, proc, 900)
        print(f"indexed and serving in {time.perf_counter() - t0:.1f} s")
        url = f"{base}/r/bench/commit/{head}"
        asyncio.run(_load(url, args.connections, args.connections))  # warm-up
        t0, cpu0 = time.perf_counter(), _cpu_s(proc.pid)
        lat, errors = asyncio.run(_load(url, args.requests, args.connections))
        wall, cpu = time.perf_counter() - t0, _cpu_s(proc.pid) - cpu0
        by_ab = _ab(url, args.requests, args.connections)
        firsts = _first_tensor_pages(base)
        hwm = _peak_rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    ms = sorted(x * 1e3 for x in lat)
    p50, p99 = statistics.median(ms), ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    print(
        f"{len(ms)} GETs of the commit page over {args.connections} connections in {wall:.1f} s"
        f" ({len(ms) / wall:.0f}/s): p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.1f} ms,"
        f" errors {errors}"
    )
    print(
        f"server CPU {cpu:.2f} s = {cpu / len(ms) * 1e3:.2f} ms a request (the machine's load"
        " stretches the wall times above; this does not)"
    )
    for name, seconds in firsts:
        print(f"first GET of the tensor page of {name}: {seconds * 1e3:.0f} ms")
    print(f"server peak RSS {hwm:.0f} MB (checkpoint {size / 1e6:.0f} MB)")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {os.cpu_count()} CPUs")
    if by_ab is not None:
        print(
            f"ab (C client, keep-alive): {args.requests} GETs over {args.connections} connections:"
            f" p50 {by_ab[0]:.0f} ms, p99 {by_ab[1]:.0f} ms, failed {by_ab[2]}"
        )
        p99, errors = by_ab[1], errors + by_ab[2]  # the server's latency, not the Python client's
    ok = p99 <= TARGET_P99_MS and errors == 0
    print(f"target p99 <= {TARGET_P99_MS:.0f} ms and no errors: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hub", description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="gpt2", help="checkpoint shape")
    p.add_argument("--dense", action="store_true", help="v2 also changes every tensor a little")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=None, help="scratch parent (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch repository")
    args = p.parse_args()
    with scratch("potluck-bench-hub-", args.workdir, args.keep) as root:
        return run(args, root)


if __name__ == "__main__":
    sys.exit(main())
