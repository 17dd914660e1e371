"""User-facing subcommands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json, file_diff_text, human_bytes, safe_field, table
from potluck.git import attributes, evalrec, setup
from potluck.git import inspect as insp
from potluck.git import maintenance as maint
from potluck.git.merge_driver import resolve as resolve_conflict
from potluck.git.repo import Repo

json_opt = click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")


@cli.command()
@handle_errors
def init() -> None:
    """Configure this git repository for potluck (idempotent, repo-local)."""
    repo = Repo(".")
    changed = install_repo(repo)
    echo(
        f"potluck: configured {repo.root}"
        + (f" ({len(changed)} settings)" if changed else " (already configured)")
    )


def install_repo(repo: Repo) -> list[str]:
    """Drivers, the pre-push and prepare-commit-msg hooks (each chained after any existing one)
    and the store directory."""
    command = _driver_command()
    changed = setup.install(repo.git, command=command)
    for hook, line in setup.HOOKS.items():
        if setup.install_hook(repo.git, hook, line(command)):
            changed.append(f"hooks/{hook}")
    repo.store.root.mkdir(parents=True, exist_ok=True)
    return changed


def _driver_command() -> str:
    """How git should start potluck: this installation's own script, by absolute path, so git
    finds it without an activated virtual environment (re-run `potluck init` after moving it)."""
    sibling = Path(sys.executable).parent / "git-potluck"
    return shlex.quote(str(sibling)) if sibling.exists() else "git-potluck"


@cli.command()
@click.argument("patterns", nargs=-1, required=True)
@handle_errors
def track(patterns: tuple[str, ...]) -> None:
    """Track files matching PATTERNS with potluck (writes .gitattributes)."""
    repo = Repo(".")
    added = attributes.add_patterns(repo.root, list(patterns))
    for p in added:
        echo(f"tracking {p}")
    if not added:
        echo("already tracked")


@cli.command()
@click.argument("patterns", nargs=-1, required=True)
@handle_errors
def untrack(patterns: tuple[str, ...]) -> None:
    """Stop tracking PATTERNS (removes their .gitattributes lines)."""
    repo = Repo(".")
    for p in attributes.remove_patterns(repo.root, list(patterns)):
        echo(f"untracked {p}")


@cli.command(name="ls")
@click.argument("spec")
@json_opt
@handle_errors
def ls_cmd(spec: str, as_json: bool) -> None:
    """List tensors of FILE or FILE@REV: name, dtype, shape, bytes."""
    repo = Repo(".")
    path, rev = insp.split_rev(spec)
    if rev is not None:
        path = repo.relpath(path)
    rows = insp.ls(repo, path, rev)
    if as_json:
        emit_json(rows)
        return
    body = [
        [
            r["name"],
            r["dtype"],
            "x".join(map(str, r["shape"])) or "()",
            r.get("note") or human_bytes(r["bytes"]),
        ]
        for r in rows
    ]
    echo(table(body, ["name", "dtype", "shape", "bytes"]))
    echo(f"{len(rows)} tensors, {human_bytes(sum(r['bytes'] for r in rows))}")


@cli.command(name="diff")
@click.argument("args", nargs=-1)
@click.option("--no-stats", is_flag=True, help="Only names and shapes (no tensor decoding).")
@json_opt
@handle_errors
def diff_cmd(args: tuple[str, ...], no_stats: bool, as_json: bool) -> None:
    """Tensor-level diff: [REV_A [REV_B]] [[--] PATHS…].

    No revision: index vs work tree; one: REV_A vs work tree; two: REV_A vs REV_B. As in git,
    leading arguments that name commits are revisions and the rest are paths.
    """
    repo = Repo(".")
    revs: list[str] = []
    rest = list(args)
    while rest and len(revs) < 2 and repo.git.rev_parse(f"{rest[0]}^{{commit}}") is not None:
        revs.append(rest.pop(0))
    paths = [repo.relpath(p) for p in rest]
    rev_a = revs[0] if revs else None
    rev_b = revs[1] if len(revs) > 1 else None
    diffs = insp.diff(repo, rev_a, rev_b, paths, stats=not no_stats)
    if as_json:
        emit_json([d.to_dict() for d in diffs])
        return
    for d in diffs:
        echo(file_diff_text(d))


@cli.command(name="log")
@click.argument("path")
@click.option("-n", "--max-count", type=int, default=None)
@json_opt
@handle_errors
def log_cmd(path: str, max_count: int | None, as_json: bool) -> None:
    """One summary line per commit that changed PATH."""
    repo = Repo(".")
    rows = insp.log(repo, path, max_count)
    evals = evalrec.evals_for(repo.git, [r["commit"] for r in rows])
    for r in rows:
        r["evals"] = evals[r["commit"]]
    if as_json:
        emit_json(rows)
        return
    for r in rows:
        c = r["counts"]
        what = (
            "deleted"
            if r["deleted"]
            else ", ".join(f"{v} {k}" for k, v in c.items() if v) or "no tensor changes"
        )
        echo(
            f"{r['commit'][:10]} {r['subject'][:50]:<50} {what}; "
            f"{human_bytes(r['changed_bytes'])} of {human_bytes(r['size'])} changed"
        )
        for v in r.get("merge") or []:
            echo(f"{'':10} merged: {v}")
        for task, ms in r["evals"].items():
            shown = ", ".join(f"{k}={v:.4g}" for k, v in ms.items())
            echo(f"{'':10} eval {task}: {shown}")


@cli.command()
@json_opt
@handle_errors
def du(as_json: bool) -> None:
    """Logical bytes (full copy per version) vs bytes stored, per file and in total."""
    rep = insp.du(Repo("."))
    if as_json:
        emit_json(rep)
        return
    rows = [
        [f["path"], f["versions"], human_bytes(f["logical"]), human_bytes(f["stored"])]
        for f in rep["files"]
    ]
    rows.append(
        ["TOTAL (deduplicated)", "", human_bytes(rep["logical"]), human_bytes(rep["stored"])]
    )
    echo(table(rows, ["path", "versions", "logical", "stored"]))
    if rep["missing"]:
        echo(f"{rep['missing']} referenced objects are not present locally")


@cli.command()
@click.option("-n", "--dry-run", is_flag=True, help="Only report what would be removed.")
@json_opt
@handle_errors
def gc(dry_run: bool, as_json: bool) -> None:
    """Delete objects no ref, reflog entry, stash, index or conflict references."""
    rep = maint.gc(Repo("."), dry_run=dry_run)
    if as_json:
        emit_json(rep.__dict__)
        return
    verb = "would remove" if dry_run else "removed"
    echo(f"{verb} {rep.removed} objects ({human_bytes(rep.freed)}), kept {rep.kept}")


@cli.command()
@json_opt
@handle_errors
def fsck(as_json: bool) -> None:
    """Re-hash every object; name each corrupt or missing object's tensors and revisions."""
    problems = maint.fsck(Repo("."))
    bad = [p for p in problems if p.kind != maint.NOT_FETCHED]
    if as_json:
        emit_json([p.to_dict() for p in problems])
    else:
        for p in bad:
            echo(f"{p.kind} object {p.oid[:12]}: {p.detail}")
            for u in p.uses:
                echo(f"  used by {u['path']} tensor {u['tensor']} in {u['revisions']}")
        if len(bad) < len(problems):
            echo(
                f"{len(problems) - len(bad)} objects of other revisions or of files left as "
                "manifests are not fetched (`potluck fetch --rev REV` gets them)"
            )
        echo(
            "ok: all objects verified"
            if not bad
            else f"{len(bad)} bad objects; restore them from a remote or another clone"
        )
    raise SystemExit(1 if bad else 0)


@cli.command()
@json_opt
@handle_errors
def status(as_json: bool) -> None:
    """Tensor-level merge conflicts and files whose tensor data is not present."""
    st = maint.status(Repo("."))
    if as_json:
        emit_json(st)
        return
    for c in st["conflicts"]:
        path = safe_field(c["path"])
        echo(f"conflict: {path}: {len(c['tensors'])} tensors changed on both sides")
        for t in c["tensors"]:
            why = c["reasons"].get(t)
            echo(f"    {safe_field(t)}" + (f"  ({why})" if why else ""))
        echo(f"  resolve with: potluck resolve {c['path']} --take ours|theirs")
    for p in st["not_materialized"]:
        have = p["tensors"] - p["tensors_missing"]
        echo(
            f"left as a manifest: {p['path']} ({have} of {p['tensors']} tensors here, "
            f"{p['missing_objects']} objects missing; `potluck pull` fetches and checks out)"
        )
    if not st["conflicts"] and not st["not_materialized"]:
        echo("potluck: nothing to report")


@cli.command()
@click.argument("path")
@click.option("--take", type=click.Choice(["ours", "theirs"]), required=True)
@click.option("--tensors", "pattern", default=None, help="Only conflicted tensors matching GLOB.")
@handle_errors
def resolve(path: str, take: str, pattern: str | None) -> None:
    """Finish a tensor-level merge conflict by taking one side."""
    repo = Repo(".")
    left = resolve_conflict(repo, repo.relpath(path), take, pattern)
    if left:
        echo(f"{len(left)} tensors still conflicted: {', '.join(map(safe_field, left))}")
    else:
        echo(f"resolved {path} (staged)")


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the demo repository instead of deleting it.")
@handle_errors
def demo(keep: bool) -> None:
    """Run the built-in example: a tiny transformer's history versioned with potluck."""
    from potluck.demo import main as demo_main

    raise SystemExit(demo_main(keep=keep))
