"""Lineage of single-file outputs (issue 17): ``patch apply BASE.safetensors P -o OUT.safetensors``
writes ``OUT.safetensors.lineage.json`` beside the file; ``potluck lineage OUT`` reads it, and a
commit of both keeps the recorded edge."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from safetensors.numpy import load_file

from conftest import Run, model, save_st
from potluck.cli.main import cli
from potluck.git.lineage import walk
from potluck.git.repo import Repo
from potluck.ops.lineage import Parent, read_lineage, weights_digest_of
from potluck.ops.patch import apply_patch, create_patch, read_patch


def _files(root: Path) -> tuple[Path, Path, Path]:
    """base.safetensors, a patch to a fine-tune of it, that patch applied into out.safetensors."""
    root.mkdir()
    base_t = model(np.random.default_rng(0), n_layers=2, d=8)
    tuned_t = dict(base_t, **{"layers.1.w": base_t["layers.1.w"] * 2})
    save_st(root / "base.safetensors", base_t)
    save_st(root / "tuned.safetensors", tuned_t)
    create_patch(root / "base.safetensors", root / "tuned.safetensors", root / "p.patch")
    apply_patch(root / "base.safetensors", root / "p.patch", root / "out.safetensors")
    return root / "base.safetensors", root / "p.patch", root / "out.safetensors"


def test_single_file_patch_apply_writes_lineage_beside_the_file(tmp_path: Path) -> None:
    base, patch, out = _files(tmp_path / "w")
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "base.safetensors", "out.safetensors", "out.safetensors.lineage.json", "p.patch",
        "tuned.safetensors",
    ]  # fmt: skip
    d_base, d_out = weights_digest_of(base), weights_digest_of(out)
    assert d_out == weights_digest_of(out.parent / "tuned.safetensors")
    lin = read_lineage(out)
    assert lin is not None and lin.weights_digest == d_out
    [edge] = lin.edges
    assert (edge.child, edge.parents, edge.relation, edge.method, edge.refs, edge.path) == (
        d_out, (Parent(None, d_base),), "patch", "patch", (str(base),), str(out)
    )  # fmt: skip
    assert edge.params["base_digest"] == read_patch(patch).base_digest
    r = CliRunner().invoke(cli, ["lineage", str(out), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert (doc["kind"], doc["notes"]) == ("file", [])
    assert [(e["child"], e["relation"], e["source"]) for e in doc["edges"]] == [
        (d_out, "patch", "lineage.json")
    ]
    # the file changed after: shown, but not vouched for
    save_st(out, {n: a + 1 for n, a in load_file(str(out)).items()})
    r = CliRunner().invoke(cli, ["lineage", str(out)])
    assert r.exit_code == 0 and "changed after the lineage was written" in r.stderr


def test_a_committed_single_file_output_keeps_its_recorded_edge(
    repo: Path, git: Run, tmp_path: Path
) -> None:
    _base, _patch, out = _files(tmp_path / "w")
    (repo / "out.safetensors").write_bytes(out.read_bytes())
    sidecar = Path(f"{out}.lineage.json")
    (repo / "out.safetensors.lineage.json").write_bytes(sidecar.read_bytes())
    git("git", "add", "out.safetensors", "out.safetensors.lineage.json")
    git("git", "commit", "-q", "-m", "the patched model")
    head = git("git", "rev-parse", "HEAD").strip()
    want = read_lineage(out)
    assert want is not None
    [edge] = walk(Repo(repo), "HEAD")
    assert (edge.child, edge.commit, edge.path, edge.source, edge.relation, edge.parents) == (
        want.weights_digest, head, "out.safetensors", "lineage.json", "patch",
        want.edges[0].parents,
    )  # fmt: skip
