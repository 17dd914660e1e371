"""Run a merge: stream tensors from memory-mapped inputs through a method into the output files.

Each output tensor is one job (``ops.merge.plan``). A pool of ``workers`` threads runs jobs (numpy
releases the GIL in the heavy loops); a byte budget (``max_memory``) bounds the working memory of
the jobs in flight. Methods whose result at an element depends only on the inputs at that element
(linear, task arithmetic, TIES/DARE without sparsification, passthrough) run on row blocks, so a
huge embedding never sits in memory as float64 copies. Results go straight to their place in the
output files (``ops.models.hfwriter``); the output directory appears only when everything succeeded.
Stochastic methods draw from generators keyed by (seed, model, tensor), so the bytes do not depend
on the number of workers or the schedule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potluck import workers
from potluck.errors import UserError
from potluck.merging import MERGE_METHODS, MergeMethod
from potluck.merging.blockwise import blockwise
from potluck.ops.lineage import record_output
from potluck.ops.merge.adamerging import learn_adamerging
from potluck.ops.merge.card import config_json, merge_edge, model_card
from potluck.ops.merge.config import MergeConfig
from potluck.ops.merge.plan import MergePlan, TensorJob, canonical_dtype, plan_merge
from potluck.ops.merge.statsfile import StatsFile, check_stats_files, load_stats, stats_for
from potluck.ops.merge.tasks import plan_task_parts, task_notes
from potluck.ops.merge.tokenizer import align_job, tokenizer_files
from potluck.ops.models.hfwriter import DEFAULT_SHARD_BYTES, HFDirWriter
from potluck.ops.models.sources import ModelSource, open_path
from potluck.tensors.dtypes import to_numpy

__all__ = ["MergeReport", "explain_merge", "run_merge"]

#: Row blocks of elementwise methods hold about this many elements per input.
BLOCK_ELEMENTS = 1 << 21
#: Bytes per element per input a job may hold at once (float64 copies and temporaries).
WORK_BYTES_PER_ELEMENT = 8 * 4
Opener = Callable[[str], ModelSource]
#: Called with the number of output bytes just written (from worker threads).
Progress = Callable[[int], None]


@dataclass
class MergeReport:
    """What a merge wrote and how long it took; ``carried`` (buffer → its model), ``left_out``
    and ``excluded`` name the tensors that were not merged (``ops.merge.buffers``)."""

    out_dir: str
    method: str
    files: list[str]
    tensors: int
    seconds: float
    workers: int
    notes: list[str] = field(default_factory=list)
    carried: dict[str, str] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dict(self.__dict__)


def _open_all(config: MergeConfig, opener: Opener, stack: ExitStack) -> dict[str, ModelSource]:
    return {ref: stack.enter_context(opener(ref)) for ref in config.referenced_models()}


def explain_merge(
    config: MergeConfig, *, opener: Opener = open_path, out_dtype: str | None = None
) -> MergePlan:
    """The plan, resolved per tensor, without merging (``potluck merge --explain``)."""
    with ExitStack() as stack:
        return plan_merge(config, _open_all(config, opener, stack), out_dtype)


def run_merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    opener: Opener = open_path,
    workers: int = 2,
    max_memory: int | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    progress: Progress | None = None,
    config_text: str | None = None,
) -> MergeReport:
    """Merge per ``config`` into the Hugging Face directory ``out_dir`` (see the module doc)."""
    start = time.perf_counter()
    if workers < 1:
        raise UserError(f"workers must be at least 1, not {workers}")
    config, config_text = learn_adamerging(config, config_text)  # adamerging: λ from data
    with ExitStack() as stack:
        sources = _open_all(config, opener, stack)
        plan = plan_merge(config, sources)
        parts = plan_task_parts(config, plan)  # tall_masks / emr: checked before merging
        base = sources[config.base_model] if config.base_model else None
        first = base or sources[config.referenced_models()[0]]
        writer = HFDirWriter(
            out_dir, [j.out for j in plan.jobs], max_shard_bytes=max_shard_bytes,
            metadata={"format": "pt"}, overwrite=overwrite,
        )  # fmt: skip
        try:
            _Runner(config, plan, sources, writer, workers, max_memory, progress).run()
            edge = merge_edge(config, plan, sources)
            extra = {"README.md": model_card(config, plan, sources, config_text, edge)}
            cfg = config_json(first.config_dir, plan, config)
            if cfg is not None:
                extra["config.json"] = cfg
            extra.update(tokenizer_files(plan.vocab, extra.get("config.json")))
            if config_text is not None:
                extra["potluck-merge.yaml"] = config_text
            files = writer.commit(first.config_dir, extra)
        except BaseException:
            writer.abort()
            raise
        record_output(out_dir, edge)
        if parts is not None:
            parts.write(out_dir, plan, sources)
    return MergeReport(
        str(out_dir), plan.method.name, files, len(plan.jobs),
        round(time.perf_counter() - start, 3), workers, plan.notes + task_notes(parts),
        **plan.unmerged_dict(), tasks=parts.written if parts else {},
    )  # fmt: skip


class _Budget:
    """A byte budget shared by the workers; a request larger than the budget runs alone."""

    def __init__(self, total: int | None) -> None:
        self.total, self.used = total, 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> int:
        if self.total is None:
            return 0
        n = min(n, self.total)
        with self.cond:
            self.cond.wait_for(lambda: self.used + n <= self.total)  # type: ignore[operator]
            self.used += n
        return n

    def release(self, n: int) -> None:
        if self.total is None:
            return
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def one_blas_thread() -> AbstractContextManager[object]:
    """BLAS limited to one thread while the pool's workers run: each worker's BLAS call
    would otherwise start its own threads and oversubscribe the cores (a TSV merge of five
    MiniLM encoders on 2 cores: 446 s with 2 BLAS threads per worker, 61 s with one)."""
    from threadpoolctl import threadpool_limits

    limits: AbstractContextManager[object] = threadpool_limits(1, user_api="blas")
    return limits


class _Runner:
    def __init__(
        self,
        config: MergeConfig,
        plan: MergePlan,
        sources: Mapping[str, ModelSource],
        writer: HFDirWriter,
        workers: int,
        max_memory: int | None,
        progress: Progress | None,
    ) -> None:
        self.config, self.plan, self.sources, self.writer = config, plan, sources, writer
        self.workers = workers
        self.budget = _Budget(max_memory)
        self.progress = progress
        self.in_dtype = None if config.dtype is None else _numpy_dtype(config.dtype)
        self.seed = config.seed
        self.stats = _stats_files(config, plan)

    def run(self) -> None:
        jobs = sorted(self.plan.jobs, key=lambda j: -j.out.size)
        if self.workers == 1:
            for job in jobs:
                self._job(job)
            return
        with (
            one_blas_thread(),
            workers.pool(self.workers, "potluck-merge") as pool,
        ):
            pending: set[Future[None]] = set()
            for job in jobs:
                pending.add(pool.submit(self._job, job))
                if len(pending) >= 2 * self.workers:
                    finished, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    for f in finished:
                        f.result()
            finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for f in finished:
                f.result()

    def _job(self, job: TensorJob) -> None:
        try:
            self._merge_job(job)
        finally:
            for model, name in (*job.models, *([job.base] if job.base else [])):
                self.sources[model].release(name)

    def _merge_job(self, job: TensorJob) -> None:
        method = MERGE_METHODS.get(job.method)
        models = [self._read(m, n, method) for m, n in job.models]
        base = None if job.base is None else self._read(*job.base, method)
        models, base = align_job(self.plan.vocab, job, models, base)  # tokenizer_source
        n_in = len(models) + (base is not None)
        bm = None
        if len(job.out.shape) >= 1 and job.out.size > BLOCK_ELEMENTS:
            bm = blockwise(method, job.params, job.weights, name=job.out.name, seed=self.seed)
        if method.needs_stats:
            bm = None  # statistics are per whole tensor
        if bm is None:
            held = self.budget.acquire(job.out.size * n_in * WORK_BYTES_PER_ELEMENT)
            try:
                extra = {}
                if method.needs_stats:
                    files = [self.stats.get(m) for m, _ in job.models]
                    extra["stats"] = stats_for(files, job.models[0][1], models)
                out = method.merge(
                    models, base, job.weights, name=job.out.name, seed=self.seed, **extra,
                    **job.params,
                )  # fmt: skip
                self._write(job, out, 0)
            finally:
                self.budget.release(held)
            return
        row = max(1, job.out.size // job.out.shape[0])
        step = max(1, self._block_elements(n_in) // row)
        held = self.budget.acquire(min(job.out.size, step * row) * n_in * WORK_BYTES_PER_ELEMENT)
        inputs = [*job.models, *([job.base] if job.base else [])]
        try:
            bm.prepare(
                models,
                base,
                lambda i: self.sources[job.models[i][0]].release(job.models[i][1]),
                step=step,
            )
            for r in range(0, job.out.shape[0], step):
                part = None if base is None else base[r : r + step]
                self._write(job, bm.block([a[r : r + step] for a in models], part), r)
                for model, name in inputs:  # rows behind us: let their pages go
                    nbytes = row * models[0].itemsize
                    self.sources[model].release(name, r * nbytes, step * nbytes)
        finally:
            self.budget.release(held)

    def _block_elements(self, n_in: int) -> int:
        """Elements per input in one row block: ``BLOCK_ELEMENTS``, fewer when the memory
        budget would not hold a block of that many (a block of one row at least)."""
        if self.budget.total is None:
            return BLOCK_ELEMENTS
        return max(1, min(BLOCK_ELEMENTS, self.budget.total // (n_in * WORK_BYTES_PER_ELEMENT)))

    def _read(self, model: str, name: str, method: MergeMethod) -> np.ndarray:
        arr = self.sources[model].read(name)
        if self.in_dtype is None or method.any_dtype:
            return arr
        return arr.astype(self.in_dtype, copy=False)  # mergekit's `dtype`: inputs cast first

    def _write(self, job: TensorJob, out: np.ndarray, row: int) -> None:
        data = np.asarray(out).astype(to_numpy(job.out.dtype), copy=False)
        self.writer.write(job.out.name, data, row)
        if self.progress is not None:
            self.progress(data.nbytes)


def _stats_files(config: MergeConfig, plan: MergePlan) -> dict[str, StatsFile]:
    """The statistics file of each model that names one (``models[].stats``), checked."""
    files = {m.model: load_stats(m.stats) for m in config.models if m.stats}
    order = [files.get(m.model) for m in config.models if m.model != config.base_model]
    check_stats_files(order, plan.method.needs_stats, plan.method.name)
    return files


def _numpy_dtype(name: str) -> np.dtype:
    return to_numpy(canonical_dtype(name))
