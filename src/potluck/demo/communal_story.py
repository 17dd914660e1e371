"""The communal story of ``potluck demo``: two contributors improve one model, each branch gets
evaluation records on its exact weights, the merges are gated (one passes, one regression is
caught), a Markdown report is written for the PR, the passing merge is promoted, and the
lineage of the result is shown.

The model is a small numpy GPT (``demo.model``); the suite's loader is ``load_model`` here, a
numpy function, so no torch is needed. The task, ``agree``, asks for the base model's greedy
next token on fixed random token sequences: the base scores 100 % and a contributor's change
must not move the model's behaviour by more than the tolerance.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from potluck.demo.model import (
    Params,
    TinyConfig,
    forward,
    init_params,
    retrain,
    save_safetensors,
)
from potluck.demo.shell import FILE, Log, Shell
from potluck.errors import UserError
from potluck.git import evalgate
from potluck.git.evalreport import build_report
from potluck.git.lineage import walk
from potluck.git.repo import Repo
from potluck.ops.evals.gate import GateResult
from potluck.ops.evals.records import EvalRecord
from potluck.ops.evals.report import to_markdown
from potluck.ops.evals.suite import Suite, load_suite
from potluck.ops.models.sources import open_path

CONFIG = TinyConfig(vocab=256, d=64, layers=2, ffn=256, ctx=16)
ITEMS = 300
SUITE = """\
potluck_suite: 1
name: communal
loader: potluck.demo.communal_story:load_model
tasks:
  - name: agree
    version: 1
    dataset: {path: agree.jsonl, split: test}
    metric: accuracy
    tolerance: 0.02
    batch_size: 64
"""


def _read(model_dir: Path) -> Params:
    src = open_path(model_dir / FILE if model_dir.is_dir() else model_dir)
    try:
        return {n: np.array(src.read(n)) for n in src.names()}
    finally:
        src.close()


def next_tokens(p: Params, sequences: Sequence[Sequence[int]]) -> list[int]:
    """The model's greedy next token after each sequence."""
    return [int(np.argmax(forward(p, np.asarray(s))[-1])) for s in sequences]


def load_model(model_dir: Path) -> Any:
    """The suite's loader: ``predict(items)`` = the greedy next token of each item's tokens."""
    p = _read(Path(model_dir))

    def predict(items: list[dict[str, Any]]) -> list[int]:
        return next_tokens(p, [it["tokens"] for it in items])

    return predict


def nudge(p: Params, rng: np.random.Generator, prefix: str, scale: float) -> Params:
    """A small fine-tuning step: tensors under ``prefix`` move by ``scale`` relative noise."""
    return {
        k: (v + scale * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32)
        if k.startswith(prefix)
        else v
        for k, v in p.items()
    }


def write_suite(root: Path, base: Params, rng: np.random.Generator) -> Path:
    """``evals/suite.yaml`` and ``evals/agree.jsonl`` (labels: ``base``'s next tokens)."""
    seqs = rng.integers(0, CONFIG.vocab, (ITEMS, 12)).tolist()
    labels = next_tokens(base, seqs)
    d = root / "evals"
    d.mkdir(exist_ok=True)
    rows = [
        {"id": f"agree-{i}", "tokens": s, "label": y}
        for i, (s, y) in enumerate(zip(seqs, labels, strict=True))
    ]
    (d / "agree.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "suite.yaml").write_text(SUITE)
    return d / "suite.yaml"


def _commit(sh: Shell, p: Params, msg: str) -> None:
    save_safetensors(p, sh.root / FILE)
    sh("git", "add", FILE)
    sh("git", "commit", "-q", "-m", msg)


def _record_line(rec: EvalRecord, cached: bool) -> str:
    se = "" if rec.stderr is None else f" ± {rec.stderr:.4f}"
    return (
        f"  {rec.task}: {rec.metric} {rec.value:.4f}{se}  n={rec.n}  {rec.trust}, per-item "
        f"outcomes {str(rec.outcomes)[:12]}, suite {rec.suite_digest[:12]}"
        + ("  (cached)" if cached else "")
    )


def _gate_lines(result: GateResult) -> list[str]:
    out = []
    for v in result.tasks:
        t = v.test
        detail = (
            v.reason or ""
            if t is None
            else (
                f"Δ {t.mean_diff:+.4f} interval [{t.lo:+.4f}, {t.hi:+.4f}] tolerance "
                f"{v.tolerance:g} min detectable effect {t.mde:.4f} n={t.n} ({t.method})"
            )
        )
        out.append(f"  {v.task:<8} {v.verdict.upper():<13} {detail}")
    return [*out, f"  verdict: {result.verdict} (exit {result.exit_code})"]


def _branches(sh: Shell, repo: Repo, rng: np.random.Generator, log: Log) -> Suite:
    p0 = init_params(CONFIG, rng)
    suite = write_suite(sh.root, p0, rng)
    sh("git", "add", str(suite.relative_to(sh.root)), "evals/agree.jsonl")
    _commit(sh, p0, "v1: community base model and its evaluation suite")
    sh("git", "tag", "v1")
    sh("git", "switch", "-q", "-c", "alice")
    _commit(sh, nudge(p0, rng, "h.0.mlp", 1e-4), "alice: fine-tune layer 0's MLP (small step)")
    sh("git", "switch", "-q", "-c", "bob", "main")
    _commit(sh, retrain(p0, rng, ("h.1.attn",)), "bob: retrain layer 1 attention")
    sh("git", "switch", "-q", "main")
    log("\n== communal development: each branch gets records on its exact weights")
    loaded = load_suite(suite)
    for rev in ("main", "alice", "bob"):
        model = evalgate.resolve_model(repo, rev)
        log(f"$ potluck eval run evals/suite.yaml {rev}     (weights {model.weights[:12]})")
        for _, rec, _, hit in evalgate.evaluate(repo, loaded, model):
            if rec is not None:
                log(_record_line(rec, hit))
    return loaded


def _gate(repo: Repo, suite: Suite, base: str, cand: str, log: Log) -> GateResult:
    log(f"$ potluck gate {base} {cand} --suite evals/suite.yaml")
    b, c = evalgate.resolve_model(repo, base), evalgate.resolve_model(repo, cand)
    result = evalgate.gate(repo, b, c, [suite])
    for line in _gate_lines(result):
        log(line)
    return result


def _rebase(sh: Shell, rng: np.random.Generator, log: Log) -> str:
    """Carol's patch, made against v1, follows the base to its new version (main)."""
    log("\n== the base moved (v1 -> main): a patch made against v1 is rebased onto it")
    carol = nudge(_read(sh.root / FILE), rng, "h.0.", 1e-3)  # main's checkout = the new base
    v1 = {k: v for k, v in _read_rev(sh, "v1").items()}
    carol = {k: v1[k] + (carol[k] - _read(sh.root / FILE)[k]) for k in v1}  # made against v1
    save_safetensors(carol, sh.root / "carol.safetensors")
    sh("potluck", "patch", "create", f"{FILE}@v1", "carol.safetensors", "-o", "carol.patch")
    log(f"$ potluck patch create {FILE}@v1 carol.safetensors -o carol.patch")
    out = sh("potluck", "patch", "rebase", "carol.patch", "--onto", f"{FILE}@main",
             "-o", "carol-main.patch")  # fmt: skip
    log(f"$ potluck patch rebase carol.patch --onto {FILE}@main -o carol-main.patch")
    lines = out.strip().splitlines()
    for line in [*lines[:3], *(["  …"] if len(lines) > 4 else []), *lines[-1:]]:
        log(f"  {line.strip()}")
    return lines[-1] if lines else ""


def _read_rev(sh: Shell, rev: str) -> Params:
    from potluck.git.inspect import load

    return {k: np.asarray(v) for k, v in load(str(sh.root / FILE), rev=rev).items()}


def communal_story(root: Path, log: Log) -> dict[str, object]:
    """Run the story in a fresh repository at ``root``; returns the checks (for tests)."""
    rng = np.random.default_rng(17)
    root.mkdir(parents=True, exist_ok=True)
    sh = Shell(root, log)
    sh("git", "init", "-q", "-b", "main")
    sh("potluck", "init")
    sh("potluck", "track", "*.safetensors")
    sh("git", "add", ".gitattributes")
    sh("git", "commit", "-q", "-m", "track checkpoints with potluck")
    repo = Repo(root)
    suite = _branches(sh, repo, rng, log)
    sh("git", "merge", "-q", "--no-ff", "-m", "merge alice", "alice")
    log("\n== the gate runs on each merged model itself (exit 0 pass, 1 fail, 3 inconclusive)")
    ok = _gate(repo, suite, "v1", "main", log)
    sh("git", "switch", "-q", "-c", "merge-bob", "main")
    sh("git", "merge", "-q", "--no-ff", "-m", "merge bob", "bob")
    sh("git", "switch", "-q", "main")
    bad = _gate(repo, suite, "main", "merge-bob", log)
    md = to_markdown(build_report(repo, "main..merge-bob"))
    log("\n$ potluck report main..merge-bob --markdown   (post it as the PR comment)")
    for line in md.splitlines():
        log(f"  | {line}")
    log("$ potluck promote main --as stable")
    ref, commit = evalgate.promote(repo, "main", "stable")
    log(f"  {ref} -> {commit[:10]}")
    log("$ potluck promote merge-bob --as stable")
    try:
        evalgate.promote(repo, "merge-bob", "stable")
        refused = ""
    except UserError as err:
        refused = err.message
        log(f"  refused: {refused}")
    log("$ potluck lineage merge-bob")
    edges = walk(repo, "merge-bob")
    for e in edges:
        parents = ", ".join(p.digest[:12] for p in e.parents)
        log(f"  {e.child[:12]} <- {e.relation} <- {parents}")
    rebased = _rebase(sh, rng, log)
    return {
        "communal_root": str(root),
        "rebase_out": rebased,
        "gate_pass": ok.verdict == "pass",
        "gate_fail": bad.verdict == "fail",
        "report_md": md,
        "promote_refused": refused,
        "lineage_relations": [e.relation for e in edges],
    }
