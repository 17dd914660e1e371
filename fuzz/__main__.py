"""Run the fuzz targets: ``python -m fuzz [TARGET ...] [options]`` (see ``fuzz/README.md``).

Every input must end in a result or a ``PotluckError`` within bounded time and memory: the
process runs under ``RLIMIT_AS`` (``--memory``), each example under a timer (``--timeout``), and
an example whose peak memory grows by more than 64 MiB + 64 bytes per input byte fails.
``--atheris`` runs one target under atheris (coverage-guided, libFuzzer) instead of hypothesis.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

GROWTH = 64 << 20
GROWTH_PER_BYTE = 64


class ExampleTimeout(Exception):
    """An example ran longer than ``--timeout`` seconds."""


class _Alarm(BaseException):
    """Raised by the timer: not an ``Exception``, so the code under test cannot swallow it."""


class Unbounded(Exception):
    """An example's memory grew more than its input's size allows."""


def _alarm(signum: int, frame: object) -> None:
    raise _Alarm


def guarded(check: Callable[[Any], None], value: Any, size: int, timeout: float) -> None:
    """``check(value)`` under the timer and the memory-growth bound; a ``PotluckError`` is a
    fine outcome, any other exception propagates."""
    from potluck.errors import PotluckError

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        check(value)
    except PotluckError:
        pass
    except _Alarm:
        raise ExampleTimeout(f"the example ran longer than {timeout} s") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    if grown > GROWTH + GROWTH_PER_BYTE * size:
        raise Unbounded(f"peak memory grew by {grown >> 20} MiB for a {size}-byte input")


def _property(name: str, timeout: float, corpus: Path | None = None) -> Any:
    from hypothesis import given

    from fuzz.targets import TARGETS

    target = TARGETS[name]
    if corpus is not None:
        (corpus / name).mkdir(parents=True, exist_ok=True)

    @given(target.strategy)
    def prop(value: Any) -> None:
        if corpus is not None and isinstance(value, bytes):  # seeds for ``--atheris --raw``
            (corpus / name / hashlib.sha1(value).hexdigest()).write_bytes(value)
        guarded(target.check, value, target.size(value), timeout)

    return prop


def run(
    name: str, examples: int, seed: int | None, timeout: float, corpus: Path | None = None
) -> dict[str, Any]:
    """Run ``examples`` generated inputs through target ``name``; the outcome as a dict."""
    from hypothesis import HealthCheck, settings
    from hypothesis import seed as with_seed
    from hypothesis.reporting import with_reporter

    prop = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=seed is None,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )(_property(name, timeout, corpus))
    if seed is not None:
        prop = with_seed(seed)(prop)
    report: list[str] = []
    start = time.monotonic()
    try:
        with with_reporter(lambda line: report.append(str(line))):
            prop()
    except Exception:
        failure = _clip("\n".join(report) + "\n" + traceback.format_exc(limit=-12))
        return {
            "target": name,
            "ok": False,
            "seconds": time.monotonic() - start,
            "failure": failure,
        }
    return {"target": name, "ok": True, "seconds": round(time.monotonic() - start, 2)}


def _clip(text: str, keep: int = 3000) -> str:
    """The start and end of ``text`` (a falsifying example can be megabytes)."""
    if len(text) <= 2 * keep:
        return text
    return f"{text[:keep]}\n[… {len(text) - 2 * keep} characters …]\n{text[-keep:]}"


def _limit_memory(mib: int) -> None:
    limit = mib << 20
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _hypothesis_main(args: argparse.Namespace) -> int:
    from fuzz.targets import TARGETS

    names = args.targets or list(TARGETS)
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    failed = 0
    deadline = time.monotonic() + args.seconds if args.seconds else None
    rounds = 0
    while True:
        for name in names:
            seed = args.seed + rounds if (args.seed is not None or deadline) else None
            print(json.dumps({"start": name, "seed": seed}), file=sys.stderr, flush=True)
            result = run(name, args.examples, seed, args.timeout, args.corpus)
            failed += not result["ok"]
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                state = "ok" if result["ok"] else "FAILED"
                print(f"{name:12} {args.examples:6} examples  {state}  {result['seconds']}s")
                if not result["ok"]:
                    print(result["failure"])
        rounds += 1
        if failed or deadline is None or time.monotonic() > deadline:
            return 1 if failed else 0


def _atheris_main(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        import atheris
    except ImportError:
        print("atheris is not installed: pip install atheris", file=sys.stderr)
        return 2
    with atheris.instrument_imports(include=["potluck"]):
        from fuzz.targets import RAW
    (name,) = args.targets or ["torch"]
    if args.raw:
        check = RAW[name]

        def one(data: bytes) -> None:
            guarded(check, data, len(data), args.timeout)

        atheris.Setup([sys.argv[0], *rest], one)
    else:
        from hypothesis import HealthCheck, settings

        prop = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))(
            _property(name, args.timeout)
        )
        atheris.Setup([sys.argv[0], *rest], prop.hypothesis.fuzz_one_input)
    atheris.Fuzz()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, bound memory, run."""
    argv = sys.argv[1:] if argv is None else argv
    rest: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    p.add_argument("targets", nargs="*", help="targets to run (default: all)")
    p.add_argument("--examples", type=int, default=50, help="inputs per target and round")
    p.add_argument("--seed", type=int, help="random seed (default: derandomized)")
    p.add_argument("--seconds", type=float, help="keep running new rounds for this long")
    p.add_argument("--memory", type=int, default=2048, help="address-space limit in MiB")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds allowed per example")
    p.add_argument("--json", action="store_true", help="one JSON result per target")
    p.add_argument("--corpus", type=Path, help="also write each generated input to DIR/TARGET/")
    p.add_argument("--atheris", action="store_true", help="coverage-guided (one target)")
    p.add_argument("--raw", action="store_true", help="atheris: feed raw bytes, no structure")
    args = p.parse_args(argv)
    _limit_memory(args.memory)
    signal.signal(signal.SIGALRM, _alarm)
    if args.atheris:
        return _atheris_main(args, rest)
    return _hypothesis_main(args)


if __name__ == "__main__":
    sys.exit(main())
