"""User-facing subcommands."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import (
    echo,
    emit_json,
    err,
    file_diff_text,
    human_bytes,
    safe_field,
    table,
    textconv_text,
)
from potluck.errors import PotluckError, UserError
from potluck.git import attributes, evalrec, evalsync, from_lfs, setup
from potluck.git import inspect as insp
from potluck.git import maintenance as maint
from potluck.git.merge_driver import resolve as resolve_conflict
from potluck.git.plumbing import Git
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
    if changed and _tracks_with_potluck(repo):  # a clone made with plain git
        fill_textconv_cache(repo)


def _tracks_with_potluck(repo: Repo) -> bool:
    """Whether HEAD's top-level .gitattributes gives any path ``filter=potluck``."""
    text = repo.git.show_blob("HEAD:.gitattributes")
    return text is not None and b"filter=potluck" in text


def fill_textconv_cache(repo: Repo) -> None:
    """Note the history's manifests in git's textconv cache, so that the first `git log -p`
    starts no textconv process per blob (only a cache: a failure is a warning)."""
    from potluck.git.textconv_cache import fill_history

    try:
        fill_history(repo.git, textconv_text)
    except PotluckError as e:
        err(f"potluck: warning: the textconv cache for `git log -p` was not filled: {e}")


def install_repo(repo: Repo) -> list[str]:
    """Drivers, the pre-push and prepare-commit-msg hooks (each chained after any existing one)
    and the store directory."""
    command = _driver_command()
    changed = setup.install(repo.git, command=command)
    for hook, line in setup.HOOKS.items():
        if setup.install_hook(repo.git, hook, line(command)):
            changed.append(f"hooks/{hook}")
    changed += evalsync.configure_remotes(repo)  # evaluation records travel with git fetch
    repo.store.root.mkdir(parents=True, exist_ok=True)
    return changed


def _driver_command() -> str:
    """How git should start potluck: this installation's own script, by absolute path, so git
    finds it without an activated virtual environment (re-run `potluck init` after moving it)."""
    sibling = Path(sys.executable).parent / "git-potluck"
    return shlex.quote(str(sibling)) if sibling.exists() else "git-potluck"


@cli.command()
@click.argument("patterns", nargs=-1, required=True)
@click.option(
    "--migrate",
    is_flag=True,
    help="Take PATTERNS over from git-lfs: rewrite their filter=lfs lines and re-add the "
    "files stored as LFS pointers (then git commit).",
)
@handle_errors
def track(patterns: tuple[str, ...], migrate: bool) -> None:
    """Track files matching PATTERNS with potluck (writes .gitattributes)."""
    done = from_lfs.track(Git(Path.cwd()), list(patterns), migrate=migrate)
    for p in done.added:
        echo(f"tracking {safe_field(p)}")
    for p in done.migrated:
        echo(f"tracking {safe_field(p)} (its filter=lfs line now routes it through potluck)")
    for p in done.readded:
        echo(f"re-added {safe_field(p)}: an LFS pointer before, a potluck manifest now")
    if done.migrated:
        echo(
            "staged; `git commit` to finish (older commits keep their LFS pointers and still "
            "check out through git-lfs)"
        )
    elif not done.added:
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
@click.option(
    "--stored",
    is_flag=True,
    help="Also how each tensor is stored (FILE@REV, HEAD for FILE): standalone, delta or "
    "delta+MODEL (a merged low-rank or scale update: lowrank8, rowscale, ...), and its bytes.",
)
@json_opt
@handle_errors
def ls_cmd(spec: str, stored: bool, as_json: bool) -> None:
    """List tensors of FILE or FILE@REV: name, dtype, shape, bytes."""
    path, rev = insp.split_rev(spec)
    if not stored and (rev is None or Path(spec).exists()):  # any file or HF directory
        rows = insp.ls_path(spec)
    else:
        repo = Repo(".")
        path = repo.relpath(path)
        rows = insp.ls(repo, path, rev or "HEAD", stored=stored)
    if as_json:
        emit_json(rows)
        return
    body = [
        [
            r["name"],
            r["dtype"],
            "x".join(map(str, r["shape"])) or "()",
            r.get("note") or human_bytes(r["bytes"]),
            *([r.get("encoding", ""), human_bytes(r.get("stored", 0))] if stored else []),
        ]
        for r in rows
    ]
    heads = ["name", "dtype", "shape", "bytes", *(["encoding", "stored"] if stored else [])]
    echo(table(body, heads))
    echo(f"{len(rows)} tensors, {human_bytes(sum(r['bytes'] for r in rows))}")


@cli.command(name="diff")
@click.argument("args", nargs=-1)
@click.option("--no-stats", is_flag=True, help="Only names and shapes (no tensor decoding).")
@click.option(
    "--no-index", is_flag=True, help="Compare two files or model directories A B on disk."
)
@json_opt
@handle_errors
def diff_cmd(args: tuple[str, ...], no_stats: bool, no_index: bool, as_json: bool) -> None:
    """Tensor-level diff: [REV_A [REV_B]] [[--] PATHS…], or A B (two files or directories).

    No revision: index vs work tree; one: REV_A vs work tree; two: REV_A vs REV_B. As in git,
    leading arguments that name commits are revisions and the rest are paths. As with
    `git diff --no-index`, two existing paths are compared directly outside a repository or
    when one lies outside it.
    """
    repo = insp.repo_here()
    if no_index or insp.compares_paths(repo, list(args)):
        if len(args) != 2:
            raise UserError("--no-index compares exactly two paths", hint="potluck diff A B")
        diffs = insp.diff_paths(args[0], args[1], stats=not no_stats, repo=repo)
    else:
        diffs = _repo_diff(repo, args, no_stats)
    if as_json:
        emit_json([d.to_dict() for d in diffs])
        return
    for d in diffs:
        echo(file_diff_text(d))


def _repo_diff(repo: Repo | None, args: tuple[str, ...], no_stats: bool) -> list[insp.FileDiff]:
    if repo is None:
        raise UserError(
            "not in a git repository",
            hint="outside a repository, `potluck diff A B` compares two files or directories",
        )
    revs: list[str] = []
    rest = list(args)
    while rest and len(revs) < 2 and repo.git.rev_parse(f"{rest[0]}^{{commit}}") is not None:
        revs.append(rest.pop(0))
    paths = [repo.relpath(p) for p in rest]
    rev_a = revs[0] if revs else None
    rev_b = revs[1] if len(revs) > 1 else None
    return insp.diff(repo, rev_a, rev_b, paths, stats=not no_stats)


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
    for how, enc in rep["encodings"].items():
        echo(f"{how}: {enc['objects']} objects, {human_bytes(enc['stored'])}")
    if rep["missing"]:
        echo(f"{rep['missing']} referenced objects are not present locally")


@cli.command()
@click.option("-n", "--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option(
    "--prune",
    metavar="DATE",
    default=None,
    help="Remove unreferenced objects older than DATE: now, never, N.unit.ago or an ISO date "
    "(default: git config potluck.pruneExpire, else 2.weeks.ago).",
)
@json_opt
@handle_errors
def gc(dry_run: bool, prune: str | None, as_json: bool) -> None:
    """Delete objects no ref, reflog entry, stash, index or conflict references."""
    rep = maint.gc(Repo("."), dry_run=dry_run, prune=prune)
    if as_json:
        emit_json(rep.__dict__)
        return
    verb = "would remove" if dry_run else "removed"
    echo(f"{verb} {rep.removed} objects ({human_bytes(rep.freed)}), kept {rep.kept}")
    if rep.recent:
        echo(
            f"kept {rep.recent} unreferenced objects ({human_bytes(rep.recent_bytes)}) written or "
            f"re-used after {rep.expire['cutoff']} (grace period {rep.expire['prune']}): a `git "
            "add` may still be using them; `potluck gc --prune=now` removes them when nothing is "
            "running"
        )
    for source in rep.damaged:
        echo(f"kept every object named by the damaged manifest {source} (`potluck fsck`)")


@cli.command()
@click.option(
    "--repair",
    is_flag=True,
    help="Quarantine damaged objects and fetch them again, remove stale temp files, rewrite "
    "damaged manifests of the checkout in canonical form; print what is left to do.",
)
@click.option("--remote", default=None, help="Remote to fetch from with --repair.")
@json_opt
@handle_errors
def fsck(repair: bool, remote: str | None, as_json: bool) -> None:
    """Re-hash every object; name each corrupt or missing object's tensors and revisions."""
    if repair:
        _fsck_repair(remote, as_json)
    problems = maint.fsck(Repo("."))
    bad = [p for p in problems if p.bad]
    if as_json:
        emit_json([p.to_dict() for p in problems])
    else:
        _echo_problems(problems)
        echo(
            "ok: all objects verified"
            if not bad
            else f"{len(bad)} problems; `potluck fsck --repair` fixes what can be fixed here"
        )
    raise SystemExit(1 if bad else 0)


def _fsck_repair(remote: str | None, as_json: bool) -> None:
    from potluck.git.repair import repair

    rep = repair(Repo("."), remote)
    if as_json:
        emit_json(rep.to_dict())
        raise SystemExit(0 if rep.healthy else 1)
    if rep.temp_removed:
        echo(f"removed {rep.temp_removed} stale temp files")
    for a in rep.actions:
        what = a.get("oid", "")[:12] or a.get("path", "")
        echo(f"{a['action']} {what}: {a['detail']}".replace(" : ", ": "))
    _echo_problems(rep.left)
    if rep.quarantined:
        echo(
            f"{rep.quarantined} damaged objects are kept in .git/potluck/objects/quarantine "
            "(delete them when you no longer need them)"
        )
    left = [p for p in rep.left if p.bad]
    echo("ok: repository healthy" if not left else f"{len(left)} problems left")
    raise SystemExit(0 if rep.healthy else 1)


def _echo_problems(problems: list[maint.Problem]) -> None:
    """Bad problems with their uses and what to run; then a line per informational kind."""
    for p in problems:
        if not p.bad:
            continue
        thing = "blob" if p.kind == maint.BAD_MANIFEST else "object"
        echo(f"{p.kind} {thing} {p.oid[:12]}: {p.detail}")
        for u in p.uses:
            tensor = f" tensor {u['tensor']}" if "tensor" in u else ""
            echo(f"  used by {u['path']}{tensor} in {u['revisions']}")
        if p.repair:
            echo(f"  to repair: {p.repair}")
    fetch = sum(1 for p in problems if p.kind == maint.NOT_FETCHED)
    if fetch:
        echo(
            f"{fetch} objects of other revisions or of files left as manifests are not fetched "
            "(`potluck fetch --rev REV` gets them)"
        )
    for p in problems:
        if p.kind == maint.OLD_MANIFEST:
            echo(f"note: {p.detail}, in {p.uses[0]['revisions']}: {p.repair}")


@cli.command()
@json_opt
@handle_errors
def status(as_json: bool) -> None:
    """Tensor-level merge conflicts and files whose tensor data is not present.

    Exit 1 while a tensor-level merge conflict is unresolved."""
    st = maint.status(Repo("."))
    if as_json:
        emit_json(st)
        sys.exit(1 if st["conflicts"] else 0)
    for c in st["conflicts"]:
        path = safe_field(c["path"])
        echo(f"conflict: {path}: {len(c['tensors'])} tensors changed on both sides")
        for t in c["tensors"]:
            why = c["reasons"].get(t)
            echo(f"    {safe_field(t)}" + (f"  ({why})" if why else ""))
        echo(f"  resolve with: potluck resolve {c['path']} --take ours|theirs")
    for p in st["not_materialized"]:
        if "damaged" in p:
            echo(f"damaged manifest: {p['path']}: {p['damaged']} (`potluck fsck`)")
        have = p["tensors"] - p["tensors_missing"]
        echo(
            f"left as a manifest: {p['path']} ({have} of {p['tensors']} tensors here, "
            f"{p['missing_objects']} objects missing)"
        )
    if st["not_materialized"]:
        from potluck.git.selection import pull_hint

        echo(f"  {pull_hint(Repo('.').git)}")
    if not st["conflicts"] and not st["not_materialized"]:
        echo("potluck: nothing to report")
    if st["conflicts"]:
        sys.exit(1)


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
