"""Evaluation records, the gate and promotion in a real git repository (``potluck eval run``,
``potluck gate``, ``potluck promote``) on the demo's numpy GPT, shrunk to 20 tensors of at most
64x256 so every evaluation takes milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import Run
from potluck.cli import eval_cmd, gate_cmd  # noqa: F401  (register the commands)
from potluck.cli.main import cli
from potluck.demo.communal_story import CONFIG, nudge, write_suite
from potluck.demo.model import init_params, retrain, save_safetensors
from potluck.git.evalrec import EVALS_REF
from potluck.tensors.digests import tensor_sha256, weights_digest
from potluck.tensors.dtypes import from_numpy

SUITE = "evals/suite.yaml"


def invoke(repo: Path, monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[int, str, str]:
    """Run the CLI in ``repo``: (exit code, stdout, stderr)."""
    monkeypatch.chdir(repo)
    r = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def digest_of(p: dict[str, np.ndarray]) -> str:
    """The reference weights digest, from the arrays themselves."""
    return weights_digest(
        {n: (from_numpy(a.dtype), a.shape, tensor_sha256(a)) for n, a in p.items()}
    )


def _commit(git: Run, repo: Path, p: dict[str, np.ndarray], msg: str) -> str:
    save_safetensors(p, repo / "model.safetensors")
    git("git", "add", "model.safetensors")
    git("git", "commit", "-q", "-m", msg)
    return git("git", "rev-parse", "HEAD").strip()


@pytest.fixture
def story(repo: Path, git: Run) -> dict[str, object]:
    """v1 (with the suite), ``good`` (a tiny nudge of layer 0) and ``bad`` (layer 1's attention
    retrained) branches; returns the params and commits."""
    rng = np.random.default_rng(17)
    p0 = init_params(CONFIG, rng)
    write_suite(repo, p0, rng)
    git("git", "add", "evals")
    v1 = _commit(git, repo, p0, "v1")
    git("git", "switch", "-q", "-c", "good")
    pg = nudge(p0, rng, "h.0.mlp", 1e-4)
    good = _commit(git, repo, pg, "good")
    git("git", "switch", "-q", "-c", "bad", "main")
    pb = retrain(p0, rng, ("h.1.attn",))
    bad = _commit(git, repo, pb, "bad")
    git("git", "switch", "-q", "main")
    return {"p0": p0, "pg": pg, "pb": pb, "v1": v1, "good": good, "bad": bad}


def test_eval_run_records_exact_weights_with_outcomes_and_caches(
    repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = invoke(repo, monkeypatch, "eval", "run", SUITE, "bad", "--json")
    assert code == 0
    [row] = json.loads(out)
    rec = row["record"]
    weights = digest_of(story["pb"])
    assert (row["task"], row["cached"], rec["weights"]) == ("agree", False, weights)
    assert (rec["trust"], rec["kind"], rec["n"], rec["metric"], rec["direction"]) == (
        "verified", "score", 300, "accuracy", "higher",
    )  # fmt: skip
    # stored under the weights digest on refs/potluck/evals, outcomes as their own object
    paths = git("git", "ls-tree", "-r", "--name-only", EVALS_REF).split()
    assert sorted(paths) == sorted([
        f"records/{weights[:2]}/{weights}/{row['record']['id']}.json",
        f"outcomes/{rec['outcomes'][:2]}/{rec['outcomes']}.json",
    ])  # fmt: skip
    outcomes = json.loads(
        git("git", "show", f"{EVALS_REF}:outcomes/{rec['outcomes'][:2]}/{rec['outcomes']}.json")
    )
    assert len(outcomes["ids"]) == 300 and set(outcomes["values"]) <= {0.0, 1.0}
    assert rec["value"] == pytest.approx(sum(outcomes["values"]) / 300)
    code, out, _ = invoke(repo, monkeypatch, "eval", "run", SUITE, "bad", "--json")
    assert json.loads(out)[0]["cached"] is True
    # the same weights in another commit share the records (keyed by content, not commit)
    git("git", "switch", "-q", "-c", "again", "main")
    _commit(git, repo, story["pb"], "same weights as bad")
    code, out, _ = invoke(repo, monkeypatch, "eval", "list", "again", "--json")
    assert [r["id"] for r in json.loads(out)["records"]] == [row["record"]["id"]]


def test_gate_passes_a_harmless_change_and_fails_a_regression(
    repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = invoke(repo, monkeypatch, "gate", "main", "good", "--suite", SUITE)
    assert code == 0, out
    assert "agree                PASS" in out and "min detectable effect" in out
    assert out.splitlines()[-1] == "verdict: pass (exit 0)"
    code, out, _ = invoke(repo, monkeypatch, "gate", "main", "bad", "--suite", SUITE, "--json")
    doc = json.loads(out)
    assert (code, doc["verdict"], doc["exit_code"]) == (1, "fail", 1)
    [task] = doc["tasks"]
    assert task["test"]["method"] == "tango-score" and task["test"]["hi"] < -0.02
    assert task["base"] == 1.0 and task["candidate"] < 0.8
    # a huge tolerance turns the same comparison into a pass (the option overrides the suite)
    code, out, _ = invoke(
        repo, monkeypatch, "gate", "main", "bad", "--suite", SUITE, "--tolerance", "0.9"
    )
    assert code == 0, out


def test_promote_needs_a_passing_gate_record_for_the_exact_weights(
    repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _, err = invoke(repo, monkeypatch, "promote", "good", "--as", "stable")
    assert code == 2
    assert "refusing to promote good as stable: no passing gate record for any task" in err
    assert (
        git("git", "rev-parse", "-q", "--verify", "refs/potluck/aliases/stable", check=False) == ""
    )
    invoke(repo, monkeypatch, "gate", "main", "good", "--suite", SUITE)
    invoke(repo, monkeypatch, "gate", "main", "bad", "--suite", SUITE)
    code, out, _ = invoke(repo, monkeypatch, "promote", "good", "--as", "stable", "--suite", SUITE)
    assert (code, out) == (0, f"refs/potluck/aliases/stable -> {story['good'][:10]}\n")
    assert git("git", "rev-parse", "refs/potluck/aliases/stable").strip() == story["good"]
    code, _, err = invoke(repo, monkeypatch, "promote", "bad", "--as", "stable")
    assert code == 2 and "no passing gate record" in err
    assert git("git", "rev-parse", "refs/potluck/aliases/stable").strip() == story["good"]
    code, _, err = invoke(repo, monkeypatch, "promote", "good", "--as", "../x")
    assert (code, err.splitlines()[0]) == (2, "potluck: error: bad alias name '../x'")


def test_records_travel_with_push_and_pull_and_merge_as_a_union(
    tmp_path: Path, repo: Path, git: Run, hub: Path, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    git("git", "push", "-q", "origin", "main", "good", "bad")
    invoke(repo, monkeypatch, "eval", "run", SUITE, "good")
    code, out, _ = invoke(repo, monkeypatch, "eval", "push")
    assert (code, out) == (0, f"pushed {EVALS_REF} to origin\n")
    other = tmp_path / "other"
    git("potluck", "-q", "clone", str(hub), str(other))
    code, out, _ = invoke(other, monkeypatch, "eval", "pull")
    assert (code, out) == (0, "records fast-forwarded\n")
    # both sides add records: a pull merges them (union), a push then fast-forwards the hub
    assert invoke(other, monkeypatch, "eval", "run", SUITE, "origin/bad")[0] == 0
    assert invoke(repo, monkeypatch, "eval", "run", SUITE, "main")[0] == 0
    code, out, _ = invoke(other, monkeypatch, "eval", "push")
    assert code == 0
    code, out, _ = invoke(repo, monkeypatch, "eval", "pull")
    assert (code, out) == (0, "merged 2 file(s) of records\n")
    code, out, _ = invoke(repo, monkeypatch, "eval", "list", "bad", "--json")
    assert [r["weights"] for r in json.loads(out)["records"]] == [digest_of(story["pb"])]
