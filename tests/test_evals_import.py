"""``potluck eval import`` of lm-evaluation-harness output and ``potluck eval export --hf``.

The fixtures in tests/data/lmeval were written by the real lm-eval 0.4.13 (``lm_eval
--log_samples``) running a local task on two tiny numpy GPTs (``make_fixtures.py`` there); the
reference values below are read from those files with plain ``json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import Run, run_in
from potluck.git.evalstore import EVALS_REF
from potluck.ops.evals.gate import compare_task
from potluck.ops.evals.lmeval import import_results
from potluck.ops.evals.records import record_from_dict
from potluck.ops.lineage import weights_digest_of
from test_gate import invoke, module_env

DATA = Path(__file__).parent / "data" / "lmeval"
RESULTS = {m: DATA / m / "results.json" for m in ("base", "tuned")}
SAMPLES = {m: DATA / m / "samples_tiny_sums.jsonl" for m in ("base", "tuned")}


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """base.npz committed, then tuned.npz over it (same path): the repository (built once per
    module) and the revision of each."""
    root = tmp_path_factory.mktemp("lmeval") / "repo"
    out = {}
    with module_env(root) as git:
        for name in ("base", "tuned"):
            shutil.copy(DATA / f"{name}.npz", root / "model.npz")
            git("git", "add", "model.npz", ".gitattributes")
            git("git", "commit", "-q", "-m", name)
            out[name] = git("git", "rev-parse", "HEAD").strip()
    return root, out


@pytest.fixture
def repo(template: tuple[Path, dict[str, str]], tmp_path: Path) -> Path:
    """A private copy of the template repository."""
    root = tmp_path / "repo"
    shutil.copytree(template[0], root, symlinks=True)
    return root


@pytest.fixture
def git(repo: Path) -> Run:
    """Command runner in the copy."""
    return run_in(repo)


@pytest.fixture
def models(template: tuple[Path, dict[str, str]]) -> dict[str, str]:
    """The commits of base and tuned."""
    return template[1]


def _samples(model: str) -> dict[str, float]:
    rows = [json.loads(line) for line in SAMPLES[model].read_text().splitlines()]
    return {str(r["doc_id"]): float(r["acc"]) for r in rows}


def test_import_with_samples_records_the_run_and_its_per_item_outcomes(
    repo: Path, git: Run, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ("eval", "import", str(RESULTS["base"]), "--samples", str(SAMPLES["base"]))
    code, out, err = invoke(repo, monkeypatch, *args, "--rev", models["base"], "--json")
    assert code == 0, err
    [rec] = json.loads(out)
    raw = json.loads(RESULTS["base"].read_text())
    assert rec["weights"] == weights_digest_of(DATA / "base.npz")
    assert (rec["value"], rec["stderr"], rec["n"]) == (
        raw["results"]["tiny_sums"]["acc,none"], raw["results"]["tiny_sums"]["acc_stderr,none"], 40
    )  # fmt: skip
    assert (rec["trust"], rec["metric"], rec["direction"], rec["seeds"], rec["batch_size"]) == (
        "community", "acc", "higher", [1234], 1,
    )  # fmt: skip
    assert rec["runner"]["name"] == "lm-evaluation-harness"
    assert rec["runner"]["version"] == "0.4.13"
    assert rec["suite"]["dataset"]["lm_eval_task_hash"] == raw["task_hashes"]["tiny_sums"]
    stored = json.loads(
        git("git", "show", f"{EVALS_REF}:outcomes/{rec['outcomes'][:2]}/{rec['outcomes']}.json")
    )
    assert dict(zip(stored["ids"], stored["values"], strict=True)) == _samples("base")
    assert record_from_dict({k: v for k, v in rec.items() if k != "id"}).id == rec["id"]


def test_import_refuses_a_weights_digest_that_is_not_the_revisions(
    repo: Path, git: Run, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = weights_digest_of(DATA / "tuned.npz")
    code, _, err = invoke(
        repo, monkeypatch, "eval", "import", str(RESULTS["base"]), "--rev", models["base"],
        "--weights", wrong,
    )  # fmt: skip
    assert code == 2
    actual = weights_digest_of(DATA / "base.npz")
    assert err.splitlines()[0] == (
        f"potluck: error: --weights {wrong[:12]} is not the digest of {models['base']} "
        f"({actual[:12]})"
    )
    assert git("git", "rev-parse", "-q", "--verify", EVALS_REF, check=False) == ""


def test_gate_without_samples_is_inconclusive_and_says_why(
    repo: Path, git: Run, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for m in ("base", "tuned"):
        assert (
            invoke(repo, monkeypatch, "eval", "import", str(RESULTS[m]), "--rev", models[m])[0] == 0
        )
    [digest] = {r.suite_digest for r, _ in import_results(RESULTS["base"], [], "0" * 64)}
    suite = repo / "lm.yaml"
    suite.write_text(f"potluck_suite: 1\ntasks:\n  - name: tiny_sums\n    digest: {digest}\n")
    code, out, _ = invoke(
        repo, monkeypatch, "gate", models["base"], models["tuned"], "--suite", str(suite)
    )
    assert code == 3
    assert out.splitlines()[1] == (
        "  tiny_sums            INCONCLUSIVE  base: no per-item outcomes; no paired test possible"
    )
    # with the samples of both runs the paired test runs on the 40 shared items
    for m in ("base", "tuned"):
        args = ("eval", "import", str(RESULTS[m]), "--samples", str(SAMPLES[m]), "--rev", models[m])
        assert invoke(repo, monkeypatch, *args)[0] == 0
    code, out, _ = invoke(
        repo, monkeypatch, "gate", models["base"], models["tuned"], "--suite", str(suite), "--json"
    )
    [task] = json.loads(out)["tasks"]
    b, t = _samples("base"), _samples("tuned")
    assert task["test"]["n"] == 40
    assert task["test"]["mean_diff"] == pytest.approx(sum(t[i] - b[i] for i in b) / 40)
    # the two models agree on every item: no discordant pair; at tolerance 0 nothing can be
    # shown (inconclusive), at 0.1 the interval (about +-0.063) shows non-inferiority
    assert (code, task["verdict"], task["test"]["discordant"]) == (3, "inconclusive", 0)
    code, out, _ = invoke(
        repo, monkeypatch, "gate", models["base"], models["tuned"], "--suite", str(suite),
        "--tolerance", "0.1",
    )  # fmt: skip
    assert (code, out.splitlines()[-1]) == (0, "verdict: pass (exit 0)")


def test_suites_with_different_digests_are_never_compared() -> None:
    [(a, _)] = import_results(RESULTS["base"], [], "a" * 64)
    other = record_from_dict({**a.to_dict(), "suite": {**a.suite, "digest": "f" * 64}})
    with pytest.raises(Exception, match="measure different suites") as e:
        compare_task(a, other, None, None, tolerance=0.01)
    assert type(e.value).__name__ == "UserError"


def test_export_hf_writes_eval_results_and_model_index(
    repo: Path, git: Run, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    invoke(repo, monkeypatch, "eval", "import", str(RESULTS["base"]), "--rev", models["base"])
    code, out, _ = invoke(
        repo, monkeypatch, "eval", "export", models["base"], "--hf", "-o", "hf", "--name", "tiny"
    )
    assert (code, out) == (0, "wrote hf/.eval_results/tiny_sums.yaml\nwrote hf/model-index.yaml\n")
    [entry] = yaml.safe_load((repo / "hf/.eval_results/tiny_sums.yaml").read_text())
    raw = json.loads(RESULTS["base"].read_text())["results"]["tiny_sums"]
    assert entry["dataset"] == {"id": "json", "task_id": "tiny_sums"}
    assert entry["value"] == raw["acc,none"]
    assert f"weights {weights_digest_of(DATA / 'base.npz')}" in entry["notes"]
    index = yaml.safe_load((repo / "hf/model-index.yaml").read_text())["model-index"][0]
    assert index["name"] == "tiny"
    [result] = index["results"]
    assert result["metrics"] == [
        {"type": "acc", "value": raw["acc,none"], "name": "acc", "verified": False}
    ]
    assert np.isclose(result["metrics"][0]["value"], 0.45)


def test_eval_run_of_a_hugging_face_classifier_directory(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The built-in torch loader on a tiny BERT classifier; the reference is the model's own
    argmax on each text, computed here with transformers."""
    from tiny_models import MOVIE_WORDS, save_tiny, tiny_bert

    torch = pytest.importorskip("torch")
    model = tiny_bert(3, vocab_size=len(MOVIE_WORDS), classifier=True, num_labels=2)
    mdir = save_tiny(model, tmp_path / "clf", words=MOVIE_WORDS)
    texts = ["good movie", "bad plot", "the movie was good", "the plot was bad", "bad bad"]
    rows = [{"id": f"t{i}", "text": t, "label": i % 2} for i, t in enumerate(texts)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "suite.yaml").write_text(
        "potluck_suite: 1\nloader: potluck.ops.evals.hf:sequence_classifier\n"
        "tasks:\n  - name: movies\n    dataset: {path: data.jsonl}\n    batch_size: 2\n"
    )
    code, out, err = invoke(
        repo, monkeypatch, "eval", "run", str(tmp_path / "suite.yaml"), str(mdir), "--json"
    )
    assert code == 0, err
    [row] = json.loads(out)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mdir)
    with torch.no_grad():
        preds = [int(model(**tok([t], return_tensors="pt")).logits.argmax(-1)) for t in texts]
    expected = [float(p == r["label"]) for p, r in zip(preds, rows, strict=True)]
    assert row["record"]["value"] == pytest.approx(sum(expected) / 5)
    assert (row["record"]["weights"], row["record"]["n"]) == (weights_digest_of(mdir), 5)


def test_eval_add_refuses_a_record_of_other_weights(
    tmp_path: Path, repo: Path, git: Run, models: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    [(rec, _)] = import_results(RESULTS["base"], [], weights_digest_of(DATA / "base.npz"))
    path = tmp_path / "rec.json"
    path.write_text(json.dumps(rec.to_dict()))
    code, _, err = invoke(repo, monkeypatch, "eval", "add", str(path), models["tuned"])
    tuned = weights_digest_of(DATA / "tuned.npz")
    assert (code, err.splitlines()[0]) == (
        2,
        f"potluck: error: the record of tiny_sums is for weights {rec.weights[:12]}, but "
        f"{models['tuned']} holds weights {tuned[:12]}",
    )
    assert git("git", "rev-parse", "-q", "--verify", EVALS_REF, check=False) == ""
    path.write_text(json.dumps({**rec.to_dict(), "trust": "verified"}))
    code, _, err = invoke(repo, monkeypatch, "eval", "add", str(path), models["base"])
    assert code == 2 and "a record added from a file is 'community'" in err
    path.write_text(json.dumps([rec.to_dict()]))
    code, out, _ = invoke(repo, monkeypatch, "eval", "add", str(path), models["base"])
    assert (code, out) == (0, f"{models['base']}: weights {rec.weights[:12]}: 1 record(s) added\n")
    code, out, _ = invoke(repo, monkeypatch, "eval", "list", models["base"], "--json")
    assert [r["id"] for r in json.loads(out)["records"]] == [rec.id]
