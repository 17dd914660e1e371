"""Scale benchmark, case ``llama`` (issue 19, item 4): a synthetic Llama checkpoint at full size.

A Llama-shaped bf16 checkpoint in the Hugging Face layout (``model-0000i-of-0000n.safetensors``
shards of at most ``--llama-shard-gb`` (5 GB), ``model.safetensors.index.json``, ``config.json``)
of about ``--llama-gb`` GB, and a history of three steps on it:

* **v0** the base; **v1** a dense update of every tensor (the two low mantissa bits of every
  value XOR-ed with random bits: 75 % of the values move by 1-3 ulps);
* **v2** a rank-8 LoRA (alpha 16) merged into every q/k/v/o projection, in float32 and rounded
  back to bf16 (round to nearest even);
* **v3** a sparse step: 1 % of the values of three tensors of the middle layer changed.

Every value comes from a counter-keyed PCG64 stream (seed, step, tensor, chunk), so any version
is regenerated in one streaming pass without reading the previous one: random 64-bit words are
viewed as bf16 and masked to |x| in [2^-7, 2^-3) (sign, two exponent bits and the mantissa are
random; norms are in [1, 1.5)). The replay runs potluck and git-lfs one after the other, each in
its own directory that is deleted before the next: add+commit of each version, ``potluck diff``
and ``git diff --stat`` of each step, checkout of v0 (checked bit for bit) and back, ``potluck
merge --method ties`` of v1 and v3 over v0 with ``--max-memory``, push of the history to a
giftless server on loopback and a clone (checked bit for bit against v3). Each step records
wall and CPU time, the peak RSS of the tool's processes (potluck's, or git-lfs's) and of git's
separately, and the growth of the tool's store.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
from threadpoolctl import threadpool_limits

from bench.common.llama import llama_config, llama_shapes
from bench.common.measure import (
    CommandError,
    TreeRssSampler,
    capture,
    children_cpu_s,
    dir_bytes,
    fmt,
    log_tail,
    machine_info,
    render_table,
    run_command,
    scratch,
)
from bench.common.tools import TOOLS, Repo

GB = 10**9
MiB = 1 << 20
MODEL_DIR = "model"
INDEX = "model.safetensors.index.json"
SEED = 19
CHUNK_ELEMENTS = 4 << 20  # values generated per block (8 MiB of bf16)
LORA_RANK, LORA_ALPHA, LORA_STD = 8, 16, 0.01
SPARSE_FRACTION = 0.01
VERSIONS = ("v0 base", "v1 dense", "v2 LoRA r8", "v3 sparse 1%")
ATTENTION = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")
LFS_ORG = "bench-scale"
LFSCONFIG = ".lfsconfig"
ADD_CLONE_TARGET = 1.2  # add, checkout and clone: <= 1.2x git-lfs wall
RSS_TARGET = 0.3  # potluck's own processes: <= 0.3x the checkpoint


# --------------------------------------------------------------------------- layout


@dataclasses.dataclass(frozen=True)
class Dims:
    """Llama hyper-parameters (no grouped-query attention: kv heads = heads, as Llama-2 13B)."""

    hidden: int
    layers: int
    heads: int
    inter: int
    vocab: int


# (smallest size in GB, hidden, heads, intermediate, vocab): Llama-2 widths from 2 GB up.
LADDER = (
    (16.0, 5120, 40, 13824, 32000),
    (2.0, 4096, 32, 11008, 32000),
    (0.5, 2048, 16, 5632, 32000),
    (0.05, 512, 8, 1376, 8000),
    (0.0, 64, 4, 176, 512),
)


def llama_dims(gb: float) -> Dims:
    """The ladder's width for ``gb`` and as many layers as bring bf16 bytes nearest to it."""
    _, hidden, heads, inter, vocab = next(row for row in LADDER if gb >= row[0])
    per_layer = 2 * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden)
    fixed = 2 * (2 * vocab * hidden + hidden)
    layers = max(1, round((gb * GB - fixed) / per_layer))
    return Dims(hidden, layers, heads, inter, vocab)


@dataclasses.dataclass(frozen=True)
class Layout:
    """Tensor shapes in file order and their split into shard files (HF's greedy rule)."""

    dims: Dims
    shapes: dict[str, tuple[int, ...]]
    shards: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def total_bytes(self) -> int:
        return sum(2 * int(np.prod(s)) for s in self.shapes.values())

    def file_bytes(self, file: str) -> int:
        names = dict(self.shards)[file]
        return len(header(self.shapes, names)) + sum(
            2 * int(np.prod(self.shapes[n])) for n in names
        )

    def config(self) -> dict[str, object]:
        d = self.dims
        cfg = llama_config(d.hidden, d.layers, d.heads, d.heads, d.inter, d.vocab, 4096)
        return {**cfg, "torch_dtype": "bfloat16"}

    def index(self) -> dict[str, object]:
        weight_map = {name: file for file, names in self.shards for name in names}
        return {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}


def make_layout(gb: float, shard_gb: float = 5.0) -> Layout:
    """A layout of about ``gb`` GB in shards of at most ``shard_gb`` GB (a tensor larger than
    that gets a shard of its own, as in ``transformers``)."""
    dims = llama_dims(gb)
    shapes = llama_shapes(dims.hidden, dims.layers, dims.heads, dims.heads, dims.inter, dims.vocab)
    limit = int(shard_gb * GB)
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    shards = tuple(
        (f"model-{i:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups, 1)
    )
    return Layout(dims, shapes, shards)


def header(shapes: dict[str, tuple[int, ...]], names: tuple[str, ...]) -> bytes:
    """The safetensors header of ``names`` (bf16, in this order), padded to 8 bytes."""
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name in names:
        nbytes = 2 * int(np.prod(shapes[name]))
        meta[name] = {
            "dtype": "BF16",
            "shape": list(shapes[name]),
            "data_offsets": [pos, pos + nbytes],
        }
        pos += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


def sparse_names(layout: Layout) -> tuple[str, ...]:
    """The three tensors the sparse step changes (middle layer: q, o and down projections)."""
    p = f"model.layers.{layout.dims.layers // 2}."
    return (
        p + "self_attn.q_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "mlp.down_proj.weight",
    )


def changed_files(layout: Layout, version: int) -> list[str]:
    """The shard files whose bytes differ from the previous version."""
    if version <= 1:
        return [file for file, _ in layout.shards]
    hit = (lambda n: n.endswith(ATTENTION)) if version == 2 else sparse_names(layout).__contains__
    return [file for file, names in layout.shards if any(hit(n) for n in names)]


# --------------------------------------------------------------------------- values


def _words(key: list[int], n: int) -> np.ndarray:
    """``n`` random uint16 from the PCG64 stream keyed by ``key``."""
    raw = np.random.PCG64(key).random_raw((n + 3) // 4)
    return raw.view(np.uint16)[:n]


def _bf16_to_f32(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def _f32_to_bf16(f: np.ndarray) -> np.ndarray:
    """Round float32 to bf16 bits, to nearest even (finite values)."""
    u = f.view(np.uint32)
    u += np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    return (u >> 16).astype(np.uint16)


def _lora(key: list[int], rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """The LoRA factors (B scaled by alpha / r, A) of one matrix."""
    g = np.random.Generator(np.random.PCG64(key))
    b = g.standard_normal((rows, LORA_RANK), dtype=np.float32) * np.float32(LORA_STD)
    a = g.standard_normal((LORA_RANK, cols), dtype=np.float32) * np.float32(LORA_STD)
    return b * np.float32(LORA_ALPHA / LORA_RANK), a


def tensor_blocks(layout: Layout, ti: int, name: str, version: int) -> Iterator[np.ndarray]:
    """The bf16 bits of tensor number ``ti`` at ``version``, in blocks of whole rows."""
    shape = layout.shapes[name]
    rows, cols = shape[0], int(np.prod(shape[1:]))
    step = max(1, CHUNK_ELEMENTS // cols)
    norm = len(shape) == 1
    lora = _lora([SEED, 2, ti], rows, cols) if version >= 2 and name.endswith(ATTENTION) else None
    sparse = version >= 3 and name in sparse_names(layout)
    for ci, r0 in enumerate(range(0, rows, step)):
        r1 = min(rows, r0 + step)
        n = (r1 - r0) * cols
        x = _words([SEED, 0, ti, ci], n).copy()
        if norm:
            x &= np.uint16(0x003F)
            x |= np.uint16(0x3F80)  # [1, 1.5)
        else:
            x &= np.uint16(0x81FF)
            x |= np.uint16(0x3C00)  # +-[2^-7, 2^-3)
        if version >= 1:
            x ^= _words([SEED, 1, ti, ci], n) & np.uint16(3)
        if lora is not None:
            f = _bf16_to_f32(x).reshape(r1 - r0, cols)
            f += lora[0][r0:r1] @ lora[1]
            x = _f32_to_bf16(f.reshape(-1))
        if sparse:
            g = np.random.Generator(np.random.PCG64([SEED, 3, ti, ci]))
            where = g.integers(0, n, size=max(1, int(n * SPARSE_FRACTION)))
            x[where] ^= g.integers(1, 64, size=where.size, dtype=np.uint16)
        yield x


def write_version(folder: Path, layout: Layout, version: int) -> dict[str, str]:
    """Write every file of ``version`` into ``folder``; returns each shard's SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(layout.config(), indent=2) + "\n")
    (folder / INDEX).write_text(json.dumps(layout.index(), indent=2) + "\n")
    order = {name: i for i, name in enumerate(layout.shapes)}
    digests: dict[str, str] = {}
    with threadpool_limits(1):  # the LoRA products: an oversubscribed BLAS is 10x slower
        for file, names in layout.shards:
            digests[file] = _write_shard(folder / file, layout, names, order, version)
    return digests


def _write_shard(
    path: Path, layout: Layout, names: tuple[str, ...], order: dict[str, int], version: int
) -> str:
    """Write one shard file of ``version``; returns its SHA-256."""
    digest = hashlib.sha256()
    with open(path, "wb", buffering=0) as out:
        head = header(layout.shapes, names)
        out.write(head)
        digest.update(head)
        for name in names:
            for block in tensor_blocks(layout, order[name], name, version):
                view = block.data.cast("B")
                out.write(view)
                digest.update(view)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(16 * MiB):
            digest.update(chunk)
    return digest.hexdigest()


def same_files(folder: Path, digests: dict[str, str]) -> bool:
    """Every shard in ``folder`` has the expected SHA-256."""
    return all((folder / f).is_file() and file_sha256(folder / f) == d for f, d in digests.items())


# --------------------------------------------------------------------------- measuring


def owner(proc: psutil.Process) -> str:
    """Whose process this is: ``tool`` (potluck or git-lfs) or ``git`` (git and its hooks)."""
    name = proc.name()
    if name == "git-lfs" or "potluck" in name or name.startswith("python"):
        return "tool"
    return "git"


class SplitRss(TreeRssSampler):
    """Samples a process tree every ~20 ms (``TreeRssSampler``): peak summed RSS of the tool's
    processes and of git's, separately, in ``split``."""

    def __init__(self) -> None:
        super().__init__()
        self.split = {"tool": 0, "git": 0}

    def _record(self, procs: list[psutil.Process]) -> None:
        sums = {"tool": 0, "git": 0}
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                sums[owner(proc)] += proc.memory_info().rss
        for key, value in sums.items():
            self.split[key] = max(self.split[key], value)


@dataclasses.dataclass
class Row:
    """One measured step of one tool."""

    tool: str
    step: str
    wall_s: float
    cpu_s: float
    rss_tool: int
    rss_git: int
    growth: int  # bytes the tool's store grew by (the clone: its whole store)
    ok: bool = True
    server_cpu_s: float = 0.0  # CPU of this process meanwhile: the giftless server's threads


def store_bytes(path: Path, tool: str) -> int:
    """Apparent bytes of the tool's store and git's objects in the repository at ``path``."""
    return sum(dir_bytes(path / rel) for rel in TOOLS[tool].stores)


def measure(repo: Repo, label: str, cmds: list[list[str]], cwd: Path | None = None) -> Row:
    """Run ``cmds`` in order as one step (in ``cwd``, default the repository)."""
    where = cwd or repo.path
    before = store_bytes(repo.path, repo.tool.name)
    cpu0, self0, t0 = children_cpu_s(), _self_cpu(), time.perf_counter()
    with SplitRss() as rss:
        for cmd in cmds:
            rc, _ = run_command(cmd, where, repo.env, repo.timeout, repo.log, rss.watch)
            if rc != 0:
                raise CommandError(f"`{' '.join(cmd)}` exited {rc}:\n{log_tail(repo.log)}")
    wall, cpu = time.perf_counter() - t0, children_cpu_s() - cpu0
    growth = store_bytes(repo.path, repo.tool.name) - before
    row = Row(repo.tool.name, label, wall, cpu, rss.split["tool"], rss.split["git"], growth)
    row.server_cpu_s = _self_cpu() - self0
    return row


# --------------------------------------------------------------------------- disk


def disk_needed(layout: Layout) -> int:
    """Bytes the run needs at its peak (the push: work tree + local store + the server's copy).

    The stores are counted as git-lfs keeps them (a full copy of every changed shard): potluck's
    is not larger, and its merge output (one more checkpoint) fits in the same bound.
    """
    size = layout.total_bytes
    store = sum(
        layout.file_bytes(f) for v in range(len(VERSIONS)) for f in changed_files(layout, v)
    )
    return size + 2 * store + GB // 2


def free_bytes(where: Path) -> int:
    return shutil.disk_usage(where).free


FLOOR_GB = 5  # a step that would leave less free (others share the disk) is not started


def ensure_room(nbytes: int, what: str, where: Path) -> None:
    """Stop the replay before ``what`` when it would leave less than ``FLOOR_GB`` free (the
    up-front check plans with the reserve; others may have used it since)."""
    free = free_bytes(where)
    if free - nbytes < FLOOR_GB * GB:
        raise CommandError(
            f"not started: {what} needs {nbytes / GB:.1f} GB of disk, {free / GB:.1f} GB free "
            f"and {FLOOR_GB} GB must stay free"
        )


def largest_fitting(room: int, shard_gb: float) -> float:
    """The largest ``--llama-gb`` (0.5 GB steps) whose run needs at most ``room`` bytes."""
    best, gb = 0.0, 0.5
    while gb <= 200 and disk_needed(make_layout(gb, shard_gb)) <= room:
        best, gb = gb, gb + 0.5
    return best


# --------------------------------------------------------------------------- the replay


@dataclasses.dataclass
class Context:
    layout: Layout
    digests: dict[int, dict[str, str]]  # version -> shard -> sha256 (from the first tool)
    server_url: str
    rows: list[Row]
    args: argparse.Namespace


def generate(ctx: Context, folder: Path, version: int) -> None:
    t0 = time.perf_counter()
    digests = write_version(folder, ctx.layout, version)
    known = ctx.digests.setdefault(version, digests)
    if known != digests:
        raise CommandError(f"generation of {VERSIONS[version]} is not deterministic")
    gbps = ctx.layout.total_bytes / GB / (time.perf_counter() - t0)
    print(f"    generated {VERSIONS[version]} at {gbps:.2f} GB/s, load {load()}", file=sys.stderr)


def run_tool(ctx: Context, name: str, root: Path) -> None:
    """The whole replay for one tool in ``root`` (deleted by the caller)."""
    repo = Repo(TOOLS[name], root, ctx.args.threads, ctx.args.timeout)
    repo.env["GIT_TERMINAL_PROMPT"] = "0"
    potluck = name == "potluck"
    if not potluck:
        repo.git_identity()
        repo.check(["git", "lfs", "install", "--skip-repo"])  # filters for the clone
    repo.setup()
    bare = root / "origin.git"
    repo.check(["git", "init", "-q", "--bare", str(bare)])
    repo.check(["git", "remote", "add", "origin", str(bare)])
    for cmd in (["git", "config"], ["git", "config", "-f", LFSCONFIG]):
        repo.check([*cmd, "lfs.url", ctx.server_url])
    model = repo.path / MODEL_DIR
    commits: list[str] = []

    def step(label: str, cmds: list[list[str]], cwd: Path | None = None) -> Row:
        row = measure(repo, label, cmds, cwd)
        ctx.rows.append(row)
        print(f"  {name}: {label}: {row.wall_s:.1f} s, load {load()}", file=sys.stderr)
        save_json(ctx.rows, ctx.layout, ctx.args)  # what a cut-off run has so far
        return row

    for v, label in enumerate(VERSIONS):
        generate(ctx, model, v)
        step(
            f"add+commit {label}", [["git", "add", "-A", "."], ["git", "commit", "-q", "-m", label]]
        )
        commits.append(repo.head())
        if v == 0:
            continue
        if potluck:
            step(
                f"potluck diff {VERSIONS[v - 1][:2]}..{label[:2]}",
                [["potluck", "diff", "HEAD~1", "HEAD"]],
            )
        step(
            f"git diff --stat {VERSIONS[v - 1][:2]}..{label[:2]}",
            [["git", "diff", "--stat", "HEAD~1", "HEAD"]],
        )
    row = step("checkout v0", [["git", "checkout", "-q", commits[0]]])
    row.ok = same_files(model, ctx.digests[0])
    step("checkout v3 (back)", [["git", "checkout", "-q", "main"]])
    if potluck:
        ensure_room(ctx.layout.total_bytes, "the merge output", root)
        merged = root / "merged"
        merge = ["potluck", "merge", "--method", "ties", "--base", f"{MODEL_DIR}@{commits[0]}"]
        merge += [f"{MODEL_DIR}@{commits[1]}", f"{MODEL_DIR}@{commits[3]}", "-o", str(merged)]
        bound = merge_memory(ctx.args.llama_max_memory, ctx.layout)
        merge += ["-p", "density=0.2", "--max-memory", bound, "--workers", str(ctx.args.threads)]
        row = step(f"potluck merge ties --max-memory {bound}", [merge])
        row.ok = merged_complete(merged, ctx.layout)
        shutil.rmtree(merged, ignore_errors=True)
    local = dir_bytes(repo.path / (".git/potluck" if potluck else ".git/lfs"))
    ensure_room(local, "the server's copy of the store", root)
    step("push (4 commits)", [["git", "push", "-q", "origin", "main"]])
    shutil.rmtree(repo.path)  # the clone needs the disk
    repo.path.mkdir()
    ensure_room(2 * ctx.layout.total_bytes, "the clone", root)
    dest = root / "clone"
    clone = ["potluck", "clone"] if potluck else ["git", "clone", "-q"]
    row = step("clone", [[*clone, str(bare), str(dest)]], cwd=root)
    row.growth = store_bytes(dest, name)
    row.ok = same_files(dest / MODEL_DIR, ctx.digests[3])


def merge_memory(option: str, layout: Layout) -> str:
    """``--max-memory`` of the merge: ``auto`` is the RSS target, 0.3x the checkpoint."""
    if option != "auto":
        return option
    return f"{int(RSS_TARGET * layout.total_bytes / 10**6)}MB"


def merged_complete(folder: Path, layout: Layout) -> bool:
    """The merge output has an index naming every tensor of the layout with its shape."""
    index = folder / INDEX
    if not index.is_file():
        files = sorted(folder.glob("*.safetensors"))
    else:
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    found: dict[str, list[int]] = {}
    for path in files:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(n))
        found.update({k: v["shape"] for k, v in meta.items() if k != "__metadata__"})
    return found == {k: list(v) for k, v in layout.shapes.items()}


def run(args: argparse.Namespace) -> int:
    """The llama case: disk check, both tools one after the other, the report."""
    layout = make_layout(args.llama_gb, args.llama_shard_gb)
    where = args.workdir or Path(os.environ.get("TMPDIR", "/tmp"))
    need, free = disk_needed(layout), free_bytes(where)
    reserve = int(args.llama_reserve_gb * GB)
    if need > free - reserve:
        fits = largest_fitting(free - reserve, args.llama_shard_gb)
        print(
            f"llama: a {layout.total_bytes / GB:.1f} GB model needs {need / GB:.1f} GB of disk; "
            f"{free / GB:.1f} GB free in {where}, {args.llama_reserve_gb:g} GB kept in reserve. "
            f"Largest size that fits: --llama-gb {fits:g}",
            file=sys.stderr,
        )
        return 2
    print(f"uptime before: {capture(['uptime'])}")
    d = layout.dims
    print(
        f"llama: {layout.total_bytes / GB:.2f} GB bf16 in {len(layout.shards)} shard(s), "
        f"hidden {d.hidden}, {d.layers} layers, heads {d.heads}, intermediate {d.inter}, "
        f"vocab {d.vocab}; disk needed {need / GB:.1f} GB of {free / GB:.1f} GB free"
    )
    from bench.remote.__main__ import serve_in_blocks
    from testsupport.servers import LfsServer

    serve_in_blocks()
    rows: list[Row] = []
    with scratch("scale-llama-lfs-", args.workdir, args.keep) as srv, LfsServer(srv) as server:
        ctx = Context(layout, {}, "", rows, args)
        for name in args.tools:
            (server.storage / LFS_ORG / name).mkdir(parents=True, exist_ok=True)
            ctx.server_url = server.url_for(LFS_ORG, name)
            with scratch(f"scale-llama-{name}-", args.workdir, args.keep) as root:
                try:
                    run_tool(ctx, name, root)
                except CommandError as exc:
                    print(f"  llama/{name}: {exc}", file=sys.stderr)
            shutil.rmtree(server.storage / LFS_ORG / name, ignore_errors=True)
    report(rows, layout, args)
    return 0


def _self_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


# --------------------------------------------------------------------------- report


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def find(rows: list[Row], tool: str, step: str) -> Row | None:
    return next((r for r in rows if (r.tool, r.step) == (tool, step)), None)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b <= 0 else f"{a / b:.2f}"


def _cells(r: Row | None) -> list[str]:
    if r is None:
        return ["-"] * 5
    return [
        fmt(r.wall_s, ".1f"),
        fmt(r.cpu_s, ".1f"),
        fmt(r.rss_tool / MiB, ".0f"),
        fmt(r.rss_git / MiB, ".0f"),
        fmt(r.growth / MiB, ".0f"),
    ]


def table(rows: list[Row]) -> str:
    """One line per step: both tools' numbers and potluck / git-lfs ratios."""
    out = []
    for label in dict.fromkeys(r.step for r in rows):
        pot, lfs = find(rows, "potluck", label), find(rows, "git-lfs", label)
        bad = any(not r.ok for r in (pot, lfs) if r is not None)

        def val(r: Row | None, field: str) -> float | None:
            return None if r is None else float(getattr(r, field))

        out.append(
            [label + (" (NOT EXACT)" if bad else ""), *_cells(pot), *_cells(lfs),
             _ratio(val(pot, "wall_s"), val(lfs, "wall_s")),
             _ratio(val(pot, "cpu_s"), val(lfs, "cpu_s")),
             _ratio(val(pot, "growth"), val(lfs, "growth"))]
        )  # fmt: skip
    header = [
        ["", "potluck", "", "RSS MiB", "", "store", "git-lfs", "", "RSS MiB", "", "store",
         "potluck/git-lfs", "", ""],
        ["step", "wall s", "CPU s", "own", "git", "+MiB", "wall s", "CPU s", "own", "git",
         "+MiB", "wall", "CPU", "store"],
    ]  # fmt: skip
    return render_table(out, header)


def targets(rows: list[Row], layout: Layout) -> list[tuple[str, str, bool | None]]:
    """Issue 19's targets for this case, judged on this run."""
    out: list[tuple[str, str, bool | None]] = []
    timed = [r.step for r in rows if r.tool == "potluck" and r.step.startswith("add+commit")]
    for label in [*timed, "checkout v0", "clone"]:
        pot, lfs = find(rows, "potluck", label), find(rows, "git-lfs", label)
        ratio = None if pot is None or lfs is None or lfs.wall_s <= 0 else pot.wall_s / lfs.wall_s
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        out.append(
            (
                f"{label}: wall <= {ADD_CLONE_TARGET}x git-lfs",
                shown,
                None if ratio is None else ratio <= ADD_CLONE_TARGET,
            )
        )
    mine = [r for r in rows if r.tool == "potluck"]
    if mine:
        worst = max(mine, key=lambda r: r.rss_tool)
        shard = max(layout.file_bytes(f) for f, _ in layout.shards)
        frac = worst.rss_tool / layout.total_bytes
        shown = f"{frac:.3f}x ({worst.rss_tool / MiB:.0f} MiB at {worst.step}; "
        shown += f"{worst.rss_tool / shard:.3f}x the largest shard)"
        out.append(
            (
                f"potluck's processes <= {RSS_TARGET}x the checkpoint in RSS, every step",
                shown,
                frac <= RSS_TARGET,
            )
        )
    exact = [
        r for r in rows if r.step in ("checkout v0", "clone") or r.step.startswith("potluck merge")
    ]
    out.append(
        (
            "checkout v0 and clone bit-exact, merge output complete",
            f"{sum(r.ok for r in exact)}/{len(exact)}",
            all(r.ok for r in exact) if exact else None,
        )
    )
    return out


def report(rows: list[Row], layout: Layout, args: argparse.Namespace) -> None:
    info = machine_info(args.threads)
    print(f"uptime after: {capture(['uptime'])}")
    print(f"machine: {info['nproc']} CPUs, {info['memory']}, {info['cpu']}; threads {args.threads}")
    print(
        "one run; RSS own: the tool's processes (potluck / git-lfs), git: git and its hooks; "
        "store: growth of .git/potluck|.git/lfs + .git/objects (clone: its whole store)"
    )
    print(f"\n== llama: {layout.total_bytes / GB:.2f} GB bf16, {len(layout.shards)} shard(s) ==")
    print(table(rows))
    print("\n== targets ==")
    for name, value, ok in targets(rows, layout):
        mark = "-" if ok is None else "PASS" if ok else "FAIL"
        print(f"{mark:4}  {name}: {value}")
    for label in ("push (4 commits)", "clone"):
        cells = [
            f"{tool} {r.server_cpu_s:.1f} s"
            for tool in args.tools
            if (r := find(rows, tool, label))
        ]
        print(f"server CPU (giftless, in this process) during {label}: {', '.join(cells)}")
    save_json(rows, layout, args)


def save_json(rows: list[Row], layout: Layout, args: argparse.Namespace) -> None:
    """Every row so far to ``--json`` (suffixed ``-llama``)."""
    if args.json:
        path = args.json.with_name(args.json.stem + "-llama.json")
        data = {"bytes": layout.total_bytes, "rows": [dataclasses.asdict(r) for r in rows]}
        path.write_text(json.dumps(data, indent=1))
