"""Evaluation records, the gate and promotion in a real git repository (``potluck eval run``,
``potluck gate``, ``potluck promote``) on the demo's numpy GPT, shrunk to 20 tensors of at most
64x256 so every evaluation takes milliseconds."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import BIN, Run, run_in
from potluck.cli import eval_cmd, gate_cmd  # noqa: F401  (register the commands)
from potluck.cli.main import cli
from potluck.demo.communal_story import CONFIG, nudge, write_suite
from potluck.demo.model import init_params, retrain, save_safetensors
from potluck.git import evalgate
from potluck.git.evalstore import EVALS_REF
from potluck.git.repo import Repo
from potluck.ops.evals.suite import load_suite
from potluck.tensors.digests import tensor_sha256, weights_digest
from potluck.tensors.dtypes import from_numpy

SUITE = "evals/suite.yaml"
LMEVAL = Path(__file__).parent / "data" / "lmeval"


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


@contextmanager
def module_env(root: Path) -> Iterator[Run]:
    """The environment conftest's autouse fixture gives a test, for a module-scoped fixture
    building a repository at ``root`` (created, ``potluck init``-ed, models tracked)."""
    root.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(root.parent))
        for k in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
            mp.setenv(k, "Test")
        for k in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
            mp.setenv(k, "test@example.invalid")
        mp.setenv("GIT_CONFIG_NOSYSTEM", "1")
        mp.setenv("PATH", BIN + os.pathsep + os.environ.get("PATH", ""))
        git = run_in(root)
        git("git", "init", "-q", "-b", "main")
        git("potluck", "init")
        git("potluck", "track", "*.safetensors", "*.npz")
        yield git


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Built once per module: v1 (with the suite), ``good`` (a tiny nudge of layer 0) and
    ``bad`` (layer 1's attention retrained) branches; the params and commits."""
    root = tmp_path_factory.mktemp("gate") / "repo"
    with module_env(root) as git:
        rng = np.random.default_rng(17)
        p0 = init_params(CONFIG, rng)
        write_suite(root, p0, rng)
        git("git", "add", "evals", ".gitattributes")
        v1 = _commit(git, root, p0, "v1")
        git("git", "switch", "-q", "-c", "good")
        pg = nudge(p0, rng, "h.0.mlp", 1e-4)
        good = _commit(git, root, pg, "good")
        git("git", "switch", "-q", "-c", "bad", "main")
        pb = retrain(p0, rng, ("h.1.attn",))
        bad = _commit(git, root, pb, "bad")
        git("git", "switch", "-q", "main")
        suite = load_suite(root / SUITE)
        repo = Repo(root)
        for rev in ("main", "good"):  # cached records: the tests below evaluate only ``bad``
            evalgate.evaluate(repo, suite, evalgate.resolve_model(repo, rev))
    return {"root": root, "p0": p0, "pg": pg, "pb": pb, "v1": v1, "good": good, "bad": bad}


@pytest.fixture
def story(template: dict[str, object], tmp_path: Path) -> dict[str, object]:
    """A private copy of the template repository (``repo``) and its data."""
    root = tmp_path / "repo"
    shutil.copytree(template["root"], root, symlinks=True)  # type: ignore[arg-type]
    return {**template, "repo": root}


@pytest.fixture
def repo(story: dict[str, object]) -> Path:
    """The story's repository."""
    return story["repo"]  # type: ignore[return-value]


@pytest.fixture
def git(repo: Path) -> Run:
    """Command runner in the story's repository."""
    return run_in(repo)


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
    listed = git("git", "ls-tree", "-r", "--name-only", EVALS_REF).split()
    paths = [p for p in listed if weights in p or rec["outcomes"] in p]
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
    tmp_path: Path, repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = tmp_path / "hub.git"
    git("git", "init", "-q", "--bare", "-b", "main", str(hub))
    git("git", "remote", "add", "origin", str(hub))
    git("git", "push", "-q", "origin", "main", "good", "bad")
    invoke(repo, monkeypatch, "eval", "run", SUITE, "good")
    code, out, _ = invoke(repo, monkeypatch, "eval", "push")
    assert (code, out) == (0, f"pushed {EVALS_REF} to origin\n")
    other = tmp_path / "other"
    git("git", "clone", "-q", str(hub), str(other))  # plain git: weights stay placeholders
    code, out, _ = invoke(other, monkeypatch, "eval", "pull")
    assert (code, out) == (0, "records fast-forwarded\n")
    # both sides add records: a pull merges them (union), a push then fast-forwards the hub
    results = str(LMEVAL / "base" / "results.json")
    code, out, err = invoke(other, monkeypatch, "eval", "import", results, "--rev", "origin/bad")
    assert code == 0, err
    assert invoke(repo, monkeypatch, "eval", "run", SUITE, "bad")[0] == 0
    code, out, _ = invoke(other, monkeypatch, "eval", "push")
    assert code == 0
    code, out, _ = invoke(repo, monkeypatch, "eval", "pull")
    assert (code, out) == (0, "merged 1 file(s) of records\n")
    code, out, _ = invoke(repo, monkeypatch, "eval", "list", "bad", "--json")
    recs = json.loads(out)["records"]
    assert sorted((r["task"] if "task" in r else r["suite"]["task"], r["trust"]) for r in recs) == [
        ("agree", "verified"),
        ("tiny_sums", "community"),
    ]
    assert {r["weights"] for r in recs} == {digest_of(story["pb"])}


def test_report_of_a_gated_branch(
    repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert invoke(repo, monkeypatch, "gate", "main", "bad", "--suite", SUITE)[0] == 1
    code, out, _ = invoke(repo, monkeypatch, "report", "main..bad", "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "## potluck report `main..bad`"
    assert "2 tensors changed, 18 unchanged." in lines
    assert "| model.safetensors | h.1 | 2 | 1.41e+00 | 100.0 % |" in lines
    [lineage] = [x for x in lines if x.startswith("- ") and "finetune" in x]
    assert lineage.startswith(f"- {story['bad'][:10]} model.safetensors: ")
    [row] = [x for x in lines if x.startswith("| agree |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:3] == ["agree", "accuracy", "1.0000 ± 0.0000"]
    assert cells[4].endswith("(paired)") and cells[5] == "**fail**"


def test_report_escapes_hostile_tensor_names(
    repo: Path, git: Run, story: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    git("git", "switch", "-q", "-c", "hostile", "main")
    evil = {"h.0.<script>|x": np.ones(4, np.float32), "a\nb": np.zeros(2, np.float32)}
    save_safetensors(evil, repo / "evil.safetensors")
    git("git", "add", "evil.safetensors")
    git("git", "commit", "-q", "-m", "hostile names")
    code, out, _ = invoke(repo, monkeypatch, "report", "main..hostile", "--markdown")
    assert code == 0
    lines = out.splitlines()
    assert "| evil.safetensors | h.0 | 1 | – | – |" in lines
    assert "| evil.safetensors | a\\\\u000ab | 1 | – | – |" in lines
    assert "- h.0.\\<script\\>\\|x (evil.safetensors): added" in lines
    assert not any("<script>" in x for x in lines)
