"""Lineage pinned by content (issue 17 item 1): weights digests, edges derived from real git
history (commits, merges through the driver), lineage.json written by merge / patch apply, the
`potluck lineage` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import Run, model, save_st
from potluck.cli.main import cli
from potluck.errors import FormatError
from potluck.git.lineage import lineage_of, parse_trailer, version_at, walk
from potluck.git.repo import Repo
from potluck.ops.lineage import Edge, Parent, read_lineage, weights_digest_of
from potluck.ops.merge.config import parse_config
from potluck.ops.merge.run import run_merge
from potluck.ops.patch import apply_patch, create_patch, read_patch
from potluck.tensors.digests import tensor_sha256, weights_digest
from test_vcs import commit


def _digest(tensors: dict[str, np.ndarray]) -> str:
    """The reference: weights_digest over (dtype, shape, tensor_sha256) spelled by hand."""
    names = {"float32": "F32", "float16": "F16"}
    return weights_digest(
        {n: (names[str(a.dtype)], a.shape, tensor_sha256(a)) for n, a in tensors.items()}
    )


def _small(seed: int = 0) -> dict[str, np.ndarray]:
    return model(np.random.default_rng(seed), n_layers=2, d=8)


def _shards(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    """A Hugging Face directory with two shards and an index."""
    path.mkdir()
    names = sorted(tensors)
    parts = {
        "model-00001-of-00002.safetensors": names[:2],
        "model-00002-of-00002.safetensors": names[2:],
    }
    for fname, part in parts.items():
        save_st(path / fname, {n: tensors[n] for n in part})
    index = {"metadata": {}, "weight_map": {n: f for f, ns in parts.items() for n in ns}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text("{}")
    return path


def test_digest_is_the_same_whatever_the_format_or_sharding(tmp_path: Path) -> None:
    t = _small()
    want = _digest(t)
    save_st(tmp_path / "one.safetensors", t)
    np.savez(tmp_path / "one.npz", **t)
    assert weights_digest_of(tmp_path / "one.safetensors") == want
    assert weights_digest_of(tmp_path / "one.npz") == want
    assert weights_digest_of(_shards(tmp_path / "sharded", t)) == want
    # one bit, one dtype or one name more changes it
    bumped = dict(t, embed=t["embed"].copy())
    bumped["embed"].view(np.uint32)[0, 0] ^= 1
    assert _digest(bumped) != want
    assert _digest(dict(t, embed=t["embed"].astype(np.float16))) != want
    assert _digest(dict(t, extra=np.zeros(1, np.float32))) != want


def test_digest_from_manifests_needs_no_decoding_and_matches_the_file(repo: Path, git: Run) -> None:
    t = _small()
    save_st(repo / "m.safetensors", t)
    c1 = commit(git, "m.safetensors", "v1")
    shutil.rmtree(repo / ".git" / "potluck" / "objects")  # no objects: oids are enough
    v = version_at(Repo(repo), c1, "m.safetensors")
    assert v is not None and v.digest == _digest(t) == weights_digest_of(repo / "m.safetensors")
    assert version_at(Repo(repo), c1, "absent.safetensors") is None


def test_commits_give_finetune_and_quantized_edges(
    repo: Path, git: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    v1 = _small()
    save_st(repo / "m.safetensors", v1)
    c1 = commit(git, "m.safetensors", "v1")
    v2 = dict(v1, embed=v1["embed"] + 1)
    save_st(repo / "m.safetensors", v2)
    c2 = commit(git, "m.safetensors", "fine-tune")
    (repo / "README.md").write_text("notes")
    c_docs = commit(git, "README.md", "docs only: no edge")
    v3 = {n: a.astype(np.float16) for n, a in v2.items()}
    save_st(repo / "m.safetensors", v3)
    c3 = commit(git, "m.safetensors", "half")
    d1, d2, d3 = _digest(v1), _digest(v2), _digest(v3)
    got = walk(Repo(repo), "HEAD")
    assert got == [
        Edge(d3, (Parent(c_docs, d2),), "quantized", "cast", {"dtypes": ["F32->F16"]},
             commit=c3, path="m.safetensors", source="commit"),
        Edge(d2, (Parent(c1, d1),), "finetune", None, {"tensors_changed": 1, "tensors": 5},
             commit=c2, path="m.safetensors", source="commit"),
    ]  # fmt: skip
    assert walk(Repo(repo), c1) == []  # the first version is a root
    monkeypatch.chdir(repo)
    r = CliRunner().invoke(cli, ["lineage", "m.safetensors"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        "m.safetensors (file): 2 edge(s)",
        f"  {d3[:12]} @{c3[:10]} m.safetensors  <- quantized [cast] <- {d2[:12]} @{c_docs[:10]}",
        f"  {d2[:12]} @{c2[:10]} m.safetensors  <- finetune <- {d1[:12]} @{c1[:10]}",
    ]


RULE = {"path": "*.safetensors", "tensors": "*", "method": "ties", "params": {"density": 0.5}}


def diverged(repo: Path, git: Run) -> tuple[dict[str, np.ndarray], str, dict[str, np.ndarray], str]:
    """A TIES merge rule (seed 3), a base commit of ``m.safetensors``, then one change of it on
    ``feature`` and another on ``main`` (checked out): (theirs, its commit, ours, its commit)."""
    (repo / ".potluck.json").write_text(json.dumps({"merge": [dict(RULE, seed=3)]}))
    commit(git, ".potluck.json", "rules")
    base = _small()
    save_st(repo / "m.safetensors", base)
    commit(git, "m.safetensors", "base")
    git("git", "switch", "-q", "-c", "feature")
    theirs = dict(base, **{"layers.0.w": base["layers.0.w"] + 0.5})
    save_st(repo / "m.safetensors", theirs)
    c_theirs = commit(git, "m.safetensors", "theirs")
    git("git", "switch", "-q", "main")
    ours = dict(base, **{"layers.0.w": base["layers.0.w"] - 0.25})
    save_st(repo / "m.safetensors", ours)
    c_ours = commit(git, "m.safetensors", "ours")
    return theirs, c_theirs, ours, c_ours


def test_merge_commit_edge_names_both_parents_method_parameters_and_seed(
    repo: Path, git: Run
) -> None:
    theirs, c_theirs, ours, c_ours = diverged(repo, git)
    git("git", "merge", "-q", "--no-edit", "feature")
    head = git("git", "rev-parse", "HEAD").strip()
    merged = Repo(repo)
    v = version_at(merged, head, "m.safetensors")
    assert v is not None
    edge = walk(merged, "HEAD", "m.safetensors")[0]
    assert (edge.child, edge.commit, edge.relation, edge.method, edge.source) == (
        v.digest,
        head,
        "merge",
        "ties",
        "merge-trailer",
    )
    assert edge.parents == (Parent(c_ours, _digest(ours)), Parent(c_theirs, _digest(theirs)))
    assert edge.params["density"] == 0.5 and edge.params["lambda_"] == 1.0
    assert edge.params["groups"][0]["seed"] == 3 and edge.params["groups"][0]["tensors"] == 1


def test_trailer_values_parse_back_to_groups() -> None:
    value = (
        '"my model.safetensors": ties(density=0.2, lambda_=1.0, weights=[1, 2], seed=7) 12 '
        "tensors; ours 1 tensor; one-sided: 30 from theirs, 4 from ours; conflicts: 1 ours "
        "(potluck resolve)"
    )
    assert parse_trailer(value) == [
        {"method": "ties", "params": {"density": 0.2, "lambda_": 1.0, "weights": [1, 2]},
         "seed": 7, "tensors": 12},
        {"method": "ours", "params": {}, "seed": None, "tensors": 1},
    ]  # fmt: skip


@pytest.fixture
def outputs(tmp_path: Path) -> dict[str, Path]:
    """base (sharded directory), a fine-tune of it, a patch of it applied into ``patched/``."""
    base_t = _small()
    tuned_t = dict(base_t, **{"layers.1.w": base_t["layers.1.w"] * 2})
    base = _shards(tmp_path / "base", base_t)
    tuned = _shards(tmp_path / "tuned", tuned_t)
    create_patch(base, tuned, tmp_path / "p.patch")
    apply_patch(base, tmp_path / "p.patch", tmp_path / "patched")
    return {
        "base": base,
        "tuned": tuned,
        "patch": tmp_path / "p.patch",
        "patched": tmp_path / "patched",
    }


def test_patch_apply_and_merge_write_lineage_json_that_chains(
    outputs: dict[str, Path], tmp_path: Path
) -> None:
    base, patched = outputs["base"], outputs["patched"]
    d_base = weights_digest_of(base)
    d_patched = weights_digest_of(patched)
    assert d_patched == weights_digest_of(outputs["tuned"])  # exact patch: the target's weights
    lin = read_lineage(patched)
    assert lin is not None and lin.weights_digest == d_patched and len(lin.edges) == 1
    e = lin.edges[0]
    assert (e.child, e.parents, e.relation, e.method, e.refs) == (
        d_patched,
        (Parent(None, d_base),),
        "patch",
        "patch",
        (str(base),),
    )
    assert e.params["base_digest"] == read_patch(outputs["patch"]).base_digest
    cfg = {"merge_method": "linear", "models": [{"model": str(base)}, {"model": str(patched)}]}
    run_merge(parse_config(cfg), tmp_path / "merged")
    merged = read_lineage(tmp_path / "merged")
    assert merged is not None and merged.weights_digest == weights_digest_of(tmp_path / "merged")
    first = merged.edges[0]
    assert (first.relation, first.method, first.parents) == (
        "merge",
        "linear",
        (Parent(None, d_base), Parent(None, d_patched)),
    )
    assert first.params == {"seed": 0, "parameters": {}}
    assert merged.edges[1:] == lin.edges  # the patched input's own lineage travels along
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"  - weights_digest: {d_patched}\n    ref: {json.dumps(str(patched))}\n" in card


def test_lineage_command_json_dot_and_a_stale_directory(outputs: dict[str, Path]) -> None:
    patched = outputs["patched"]
    d_base, d_patched = weights_digest_of(outputs["base"]), weights_digest_of(patched)
    r = CliRunner().invoke(cli, ["lineage", str(patched), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["kind"], doc["notes"], len(doc["edges"])) == ("directory", [], 1)
    assert doc["edges"][0]["parents"] == [
        {"commit": None, "digest": d_base, "ref": str(outputs["base"])}
    ]
    r = CliRunner().invoke(cli, ["lineage", str(patched), "--dot"])
    assert r.stdout.splitlines() == [
        "digraph lineage {",
        "  rankdir=BT;",
        f'  "{d_base[:12]}" -> "{d_patched[:12]}" [label="patch: patch"];',
        "}",
    ]
    # weights changed after the lineage was written: shown, but not vouched for
    shard = patched / "model-00001-of-00002.safetensors"
    save_st(shard, {n: a + 1 for n, a in load_file(str(shard)).items()})
    r = CliRunner().invoke(cli, ["lineage", str(patched)])
    assert r.exit_code == 0 and "changed after the lineage was written" in r.stderr


def test_a_damaged_lineage_file_is_a_clear_error(outputs: dict[str, Path]) -> None:
    path = outputs["patched"] / "lineage.json"
    doc = json.loads(path.read_text())
    doc["edges"][0]["relation"] = "adopted"
    path.write_text(json.dumps(doc))
    r = CliRunner().invoke(cli, ["lineage", str(outputs["patched"])])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit)
    assert f"potluck: error: {path}: edge 0: unknown relation 'adopted'" in r.stderr
    path.write_text("{")
    with pytest.raises(FormatError, match="not valid JSON"):
        read_lineage(outputs["patched"])
    path.write_text(json.dumps({"potluck_lineage": 2, "edges": []}))
    with pytest.raises(FormatError, match='need "potluck_lineage": 1'):
        lineage_of(str(outputs["patched"]))


def test_committed_output_directory_keeps_its_recorded_edge(
    repo: Path, git: Run, outputs: dict[str, Path]
) -> None:
    shutil.copytree(outputs["patched"], repo / "patched")
    git("git", "add", "patched")
    git("git", "commit", "-q", "-m", "the patched model")
    head = git("git", "rev-parse", "HEAD").strip()
    assert version_at(Repo(repo), head, "patched") is not None
    [edge] = walk(Repo(repo), "HEAD")
    want = read_lineage(outputs["patched"])
    assert want is not None
    assert (edge.child, edge.commit, edge.path, edge.source) == (
        want.weights_digest,
        head,
        "patched",
        "lineage.json",
    )
    assert (edge.parents, edge.relation) == (want.edges[0].parents, "patch")
    # weights edited after: the stale lineage.json vouches for nothing; the commit is a finetune
    shard = repo / "patched" / "model-00002-of-00002.safetensors"
    save_st(shard, {n: a * 2 for n, a in load_file(str(shard)).items()})
    git("git", "commit", "-q", "-am", "edited by hand")
    edited = git("git", "rev-parse", "HEAD").strip()
    now = walk(Repo(repo), "HEAD")
    assert [(e.commit, e.relation, e.source) for e in now] == [
        (edited, "finetune", "commit"),
        (head, "patch", "lineage.json"),
    ]
    assert now[0].parents == (Parent(head, want.weights_digest),)


def test_lineage_of_a_patch_finds_its_base_in_the_repository(repo: Path, git: Run) -> None:
    v1 = _small()
    save_st(repo / "m.safetensors", v1)
    c1 = commit(git, "m.safetensors", "v1")
    save_st(repo / "m.safetensors", dict(v1, embed=v1["embed"] * 3))
    commit(git, "m.safetensors", "v2")
    save_st(repo / "t.safetensors", dict(v1, embed=v1["embed"] + 2))
    save_st(repo / "old.safetensors", v1)  # a copy of v1 outside git: the patch pins its hashes
    create_patch(repo / "old.safetensors", repo / "t.safetensors", repo / "b.patch")
    r = CliRunner().invoke(cli, ["lineage", str(repo / "b.patch"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["kind"] == "patch"
    assert doc["edges"][0]["parents"] == [
        {"commit": c1, "digest": _digest(v1), "ref": f"m.safetensors@{c1[:10]}"}
    ]


def test_commit_digest_tells_apart_files_whose_tensor_names_collide(repo: Path, git: Run) -> None:
    """Two checkpoints of one commit that both hold a tensor ``weight`` (task heads, say): a
    change of either changes the commit's weights digest, and no such digest is the digest of
    one file's tensors alone. Shards of one model (no shared name) keep the sharding-independent
    digest."""
    from potluck.git.evalstore import digest_at

    head = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    save_st(repo / "x.safetensors", head)
    save_st(repo / "y.safetensors", {k: v + 1 for k, v in head.items()})
    git("git", "add", "x.safetensors")
    c1 = commit(git, "y.safetensors", "two heads")
    save_st(repo / "x.safetensors", {k: v + 2 for k, v in head.items()})
    c2 = commit(git, "x.safetensors", "x changed")
    r = Repo(repo)
    d1, d2 = digest_at(r, c1), digest_at(r, c2)
    assert d1 != d2
    assert d1 not in {_digest(head), _digest({k: v + 1 for k, v in head.items()})}
    # qualified by path: the digest of the two files' tensors under "<path>:<name>"
    assert d1 == _digest(
        {f"{p}:{n}": a for p, t in (("x.safetensors", head),
                                   ("y.safetensors", {k: v + 1 for k, v in head.items()}))
         for n, a in t.items()}
    )  # fmt: skip


def test_digest_of_colliding_checkpoints_without_labels_is_refused() -> None:
    from potluck.errors import UserError
    from potluck.objects.manifest import Manifest, TensorEntry
    from potluck.ops.lineage import manifests_digest

    def m(oid: str) -> Manifest:
        return Manifest("safetensors", 4, (TensorEntry("weight", "F32", (1,), oid, 4),))

    with pytest.raises(UserError, match="tensor 'weight' is in two of the checkpoints"):
        manifests_digest([m("a" * 64), m("b" * 64)], lambda _m, _n: np.zeros(1))
    assert manifests_digest([m("a" * 64), m("b" * 64)], lambda _m, _n: np.zeros(1), ["x", "y"]) != (
        manifests_digest([m("a" * 64), m("c" * 64)], lambda _m, _n: np.zeros(1), ["x", "y"])
    )
