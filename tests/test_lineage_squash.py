"""A ``git merge --squash`` of checkpoints through the merge driver is a merge edge in
``potluck lineage`` (issue 17): the squash commit has one parent, so its trailer names the squashed
branch's tip and that file's weights digest there, and the edge holds even in a clone that never
fetched the branch."""

from __future__ import annotations

from pathlib import Path

from conftest import Run, run_in, save_st
from potluck.git.lineage import walk
from potluck.git.repo import Repo
from potluck.ops.lineage import Parent
from test_lineage import _digest, diverged
from test_vcs import commit


def test_squash_merge_through_the_driver_is_a_merge_edge(
    repo: Path, git: Run, tmp_path: Path
) -> None:
    theirs, c_theirs, ours, c_ours = diverged(repo, git)
    git("git", "merge", "-q", "--squash", "feature")
    git("git", "commit", "-q", "-m", "squashed feature")
    head = git("git", "rev-parse", "HEAD").strip()
    assert git("git", "rev-list", "--parents", "-n1", "HEAD").split() == [head, c_ours]
    message = git("git", "log", "-1", "--format=%B")
    d_theirs = _digest(theirs)
    [trailer] = [ln for ln in message.splitlines() if ln.startswith("Potluck-Merge: ")]
    assert trailer.startswith("Potluck-Merge: m.safetensors: ties(consensus=sum, density=0.5, ")
    assert trailer.endswith(
        f"seed=3) 1 tensor; one-sided: 0 from theirs, 0 from ours; squashed {c_theirs} {d_theirs}"
    )
    want_parents = (Parent(c_ours, _digest(ours)), Parent(c_theirs, d_theirs))
    edge = walk(Repo(repo), "HEAD", "m.safetensors")[0]
    assert (edge.commit, edge.relation, edge.method, edge.parents, edge.source) == (
        head, "merge", "ties", want_parents, "squash-trailer"
    )  # fmt: skip
    assert edge.params["squash"] is True and edge.params["groups"][0]["seed"] == 3
    # a clone of main alone never sees the feature commit: the trailer still pins it
    clone = tmp_path / "clone"
    run_in(tmp_path)("git", "clone", "-q", "--no-local", "--single-branch", "-b", "main",
                     f"file://{repo}", str(clone))  # fmt: skip
    assert run_in(clone)("git", "rev-parse", "-q", "--verify", c_theirs + "^{commit}",
                         check=False) == ""  # fmt: skip
    edge = walk(Repo(clone), "HEAD", "m.safetensors")[0]
    assert (edge.relation, edge.parents) == ("merge", want_parents)
    # an ordinary commit after it is a finetune again (the record was cleared)
    save_st(repo / "m.safetensors", dict(ours, **{"layers.1.b": ours["layers.1.b"] + 1}))
    after = commit(git, "m.safetensors", "tweak")
    assert "Potluck-Merge" not in git("git", "log", "-1", "--format=%B")
    edge = walk(Repo(repo), "HEAD", "m.safetensors")[0]
    assert (edge.commit, edge.relation, edge.source) == (after, "finetune", "commit")
