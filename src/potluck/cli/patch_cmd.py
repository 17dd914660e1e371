"""``potluck patch create|apply|stack|info``: ship a fine-tune as a small update of a base.

BASE and TARGET are model references: a checkpoint file, a Hugging Face directory, or
``file@rev`` / ``dir@rev`` in the potluck repository containing the path (``open_model``).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from potluck.cli.main import cli, handle_errors
from potluck.cli.render import echo, emit_json, secho
from potluck.codecs import CODECS, SignScaledCodec
from potluck.codecs.rules import Rule
from potluck.errors import UserError
from potluck.git.inspect import split_rev
from potluck.git.models import open_model
from potluck.ops.models import ModelSource
from potluck.ops.patch import (
    OutputChange,
    PatchInfo,
    QualityReport,
    apply_patch,
    create_patch,
    patch_info,
    stack_patches,
)
from potluck.ops.patch.evaluate import check_eval_target, eval_patch
from potluck.ops.patch.tune_scales import ScaleTuning, TuneSettings
from potluck.ops.patch.weights import StatsLookup

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def is_directory_ref(spec: str, model: ModelSource) -> bool:
    """Whether the model reference ``spec`` names a model directory (so -o is one too).

    A path on disk is a directory or not; for ``path@rev`` the path part decides (a name without
    a checkpoint suffix is a directory), as does a model stored in several shard files.
    """
    p = Path(spec)
    if p.exists():
        return p.is_dir()
    path, _rev = split_rev(spec)
    return not path.endswith(_WEIGHT_SUFFIXES) or len(set(model.files.values())) > 1


def parse_rule(text: str) -> Rule:
    """``'GLOB=codec[:k=v,…]'`` → (pattern, codec, params); values stay strings (codecs convert)."""
    pattern, eq, spec = text.partition("=")
    codec, _, rest = spec.partition(":")
    if not eq or not pattern or not codec:
        raise UserError(
            f"bad --rule {text!r}",
            hint="write GLOB=codec or GLOB=codec:k=v,k=v (e.g. '*attn*=lowrank:rank=8')",
        )
    params: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"bad parameter {item!r} in --rule {text!r}", hint="write k=v")
        params[key.strip()] = value.strip()
    return (pattern, codec.strip(), params)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


@cli.group()
def patch() -> None:
    """Create, apply and inspect patches (a fine-tune as a small update of a pinned base)."""


@patch.command("create")
@click.argument("base")
@click.argument("target")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--codec", default="exact_xor", show_default=True, help="Default codec.")
@click.option("--rank", type=int, help="lowrank: maximum rank.")
@click.option("--density", type=float, help="sparse codecs: fraction of elements kept.")
@click.option("--bits", type=int, help="quant: bits per code (4 or 8).")
@click.option("--tensors", "glob", help="Only tensors whose name matches this glob.")
@click.option("--rule", "rules", multiple=True, help="GLOB=codec[:k=v,…]; first match wins.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random codecs.")
@click.option("--author", help="Recorded in the patch description.")
@click.option("--task", help="Recorded in the patch description.")
@click.option("--license", "license_", help="Recorded in the patch description.")
@click.option("--check", is_flag=True, help="Decode every tensor and report its error vs TARGET.")
@click.option(
    "--eval",
    "eval_file",
    type=click.Path(exists=True, dir_okay=False),
    help="With --check: JSONL/npz inputs; report the change in TARGET's model outputs.",
)
@click.option("--eval-max", type=int, default=64, show_default=True, help="--eval examples.")
@click.option("--threads", type=int, default=2, show_default=True, help="--eval torch threads.")
@click.option(
    "--budget",
    metavar="SIZE",
    help="Fit the patch in SIZE (bytes, 5MB, 512KiB, or x16 = 1/16 of the fp16 delta): "
    "potluck picks each tensor's codec. Not with --codec/--rule/--rank/--density/--bits.",
)
@click.option(
    "--max-error",
    type=float,
    metavar="TOL",
    help="Keep every tensor's relative Frobenius error within TOL (alone: the smallest such "
    "patch; with --budget: refused when it cannot fit).",
)
@click.option(
    "--gram",
    "gram_file",
    type=click.Path(exists=True, dir_okay=False),
    help="With --budget/--max-error: weight each tensor's error by its effect on the layer's "
    "outputs, from a `potluck stats gram` file (--embeddings there covers embeddings).",
)
@click.option(
    "--tune-scales/--no-tune-scales",
    default=True,
    show_default=True,
    help="With --eval: tune the scales of sign-coded tensors (bitdelta, ternary) on TARGET's "
    "outputs (ComPEFT's α grid, then BitDelta's scale distillation).",
)
@click.option(
    "--distill-steps",
    type=click.IntRange(min=0),
    default=100,
    show_default=True,
    help="With --eval: Adam steps of the scale distillation (0: the α grid only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def create_cmd(
    base: str,
    target: str,
    out: str,
    codec: str,
    rank: int | None,
    density: float | None,
    bits: int | None,
    glob: str | None,
    rules: tuple[str, ...],
    seed: int,
    author: str | None,
    task: str | None,
    license_: str | None,
    check: bool,
    eval_file: str | None,
    eval_max: int,
    threads: int,
    budget: str | None,
    max_error: float | None,
    gram_file: str | None,
    tune_scales: bool,
    distill_steps: int,
    as_json: bool,
) -> None:
    """Write a patch turning BASE into TARGET (files, model directories or PATH@REV).

    With --eval, the scales of sign-coded tensors (bitdelta, ternary) are tuned on TARGET's
    outputs; with --check, the change in outputs is reported; with --budget/--max-error, the
    errors are weighted by Gram matrices of TARGET on those inputs."""
    flags = {"rank": rank, "density": density, "bits": bits}
    if budget is not None or max_error is not None:
        _refuse_codec_choice(flags, rules)
    described = {"author": author, "task": task, "license": license_}
    parsed = [parse_rule(r) for r in rules]
    weighting = budget is not None or max_error is not None
    tune = _tune_settings(
        eval_file, check, weighting, codec, parsed, tune_scales, distill_steps, eval_max, threads
    )
    if eval_file is not None and gram_file is not None and weighting:
        raise UserError(
            "--eval and --gram both weight the budget's errors; pass one of them",
            hint="drop --gram to use Gram matrices of TARGET on the --eval inputs",
        )
    stats = None if gram_file is None else _gram_stats(gram_file, budget, max_error)
    with ExitStack() as stack:
        base_src = stack.enter_context(open_model(base))
        target_src = stack.enter_context(open_model(target))
        if eval_file is not None:
            target_dir = check_eval_target(target_src)  # before anything is written
            if weighting:
                tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="potluck-gram-"))
                stats = _eval_gram(target_dir, eval_file, eval_max, Path(tmp))
        info = create_patch(
            base_src,
            target_src,
            out,
            rules=parsed,
            default_codec=codec,
            params={k: v for k, v in flags.items() if v is not None},
            seed=seed,
            description={k: v for k, v in described.items() if v is not None},
            tensors_glob=glob,
            check=check,
            budget=budget,
            max_error=max_error,
            stats=stats,
            tune=tune,
        )
        if eval_file is not None and info.quality is not None:
            outputs = eval_patch(
                base_src, target_src, out, eval_file, max_samples=eval_max, threads=threads
            )
            info = dataclasses.replace(
                info, quality=dataclasses.replace(info.quality, outputs=outputs)
            )
    if as_json:
        emit_json(create_json(info))
        return
    _render_create(info)


def _tune_settings(
    eval_file: str | None,
    check: bool,
    weighting: bool,
    codec: str,
    rules: list[Rule],
    tune_scales: bool,
    distill_steps: int,
    eval_max: int,
    threads: int,
) -> TuneSettings | None:
    """What --eval tunes, or ``None``; --eval that would do nothing is refused, as are the
    tuning options given without --eval."""
    ctx = click.get_current_context()
    given = [
        f"--{k.replace('_', '-')}"
        for k in ("tune_scales", "distill_steps")
        if ctx.get_parameter_source(k) == click.core.ParameterSource.COMMANDLINE
    ]
    if eval_file is None:
        if given:
            raise UserError(f"{', '.join(given)} needs --eval", hint="add --eval FILE")
        return None
    sign_codecs = [n for n, c in CODECS.items() if isinstance(c, SignScaledCodec)]
    signs = weighting or any(c in sign_codecs for c in [codec, *(r[1] for r in rules)])
    if not (check or weighting or (signs and tune_scales)):
        raise UserError(
            "--eval needs --check, --budget/--max-error (whose errors it then weights) or a "
            f"sign codec ({', '.join(sorted(sign_codecs))}) whose scales it tunes",
            hint="add --check",
        )
    if not (signs and tune_scales):
        return None
    return TuneSettings(eval_file, distill_steps, max_samples=eval_max, threads=threads)


def _eval_gram(model_dir: Path, data: str, max_samples: int, tmp: Path) -> StatsLookup:
    """Gram statistics (with embedding lookup counts) of TARGET on the --eval inputs."""
    from potluck.ops.merge.stats_torch import compute_stats
    from potluck.ops.merge.statsfile import load_stats

    out = tmp / "eval.gram.stats"
    compute_stats("gram", model_dir, data, out, max_samples=max_samples, embeddings=True)
    return load_stats(out).tensor_stats


def _gram_stats(path: str, budget: str | None, max_error: float | None) -> StatsLookup:
    """The Gram statistics of ``--gram`` by tensor name (only with --budget/--max-error)."""
    from potluck.ops.merge.statsfile import load_stats

    if budget is None and max_error is None:
        raise UserError("--gram needs --budget or --max-error", hint="add --budget SIZE")
    stats = load_stats(path)
    if stats.kind != "gram":
        raise UserError(
            f"{path} holds {stats.kind} statistics, not Gram matrices",
            hint="compute them with `potluck stats gram MODEL --data FILE -o OUT --embeddings`",
            path=path,
        )
    return stats.tensor_stats


def _refuse_codec_choice(flags: dict[str, int | float | None], rules: tuple[str, ...]) -> None:
    """--budget/--max-error choose every tensor's codec: a codec chosen by hand conflicts."""
    ctx = click.get_current_context()
    given = [f"--{k}" for k, v in flags.items() if v is not None]
    if ctx.get_parameter_source("codec") == click.core.ParameterSource.COMMANDLINE:
        given.insert(0, "--codec")
    if rules:
        given.append("--rule")
    if given:
        raise UserError(
            f"--budget/--max-error choose each tensor's codec; {', '.join(given)} cannot be "
            "combined with them",
            hint="drop " + ", ".join(given) + " to let the budget decide, or drop "
            "--budget/--max-error to choose codecs yourself",
            conflicting=given,
        )


def create_json(info: PatchInfo) -> dict[str, Any]:
    """The JSON ``patch create --json`` prints."""
    return {
        "path": info.path,
        "size": info.size,
        "base_digest": info.base_digest,
        "tensors": {
            e.name: {
                "codec": e.codec,
                "bytes": e.nbytes,
                "full_bytes": e.full_nbytes,
                "relative_error": e.relative_error,
                "predicted_error": e.predicted_error,
            }
            for e in info.entries
        },
        "added": info.added,
        "removed": info.removed,
        "unchanged": info.unchanged,
        "check": None if info.quality is None else info.quality.to_dict(),
        "scales_tuned": None if info.scales is None else _tuning_json(info.scales),
    }


def _tuning_json(t: ScaleTuning) -> dict[str, Any]:
    return {
        **t.record(),
        "kept": t.kept,
        "tuned": t.tensors,
        "skipped": t.skipped,
        "seconds": t.seconds,
    }


def _render_tuning(t: ScaleTuning) -> None:
    how = [] if t.alpha is None else [f"ComPEFT α ×{t.alpha:g}"]
    how.append(f"BitDelta distillation, {t.steps} steps" if t.steps else "no distillation")
    less = 1 - t.loss_after / t.loss_before if t.loss_before > 0 else 0.0
    echo(
        f"scales tuned on {t.samples} --eval examples: {len(t.tensors)} tensors "
        f"({'; '.join(how)}): output MSE {t.loss_before:.4g} → {t.loss_after:.4g} "
        f"({less:.1%} less), {t.seconds:.1f} s"
    )
    if not t.kept:
        echo("the tuned scales were not kept: the patch would have outgrown --budget")
    if t.skipped:
        echo(f"not tuned (no such parameter in TARGET's model): {', '.join(t.skipped)}")


def _render_create(info: PatchInfo) -> None:
    for e in info.entries:
        err = "exact" if e.relative_error is None else f"rel.err {e.relative_error:.3g}"
        if e.predicted_error is not None:
            err += f" (predicted {e.predicted_error:.3g})"
        mark = " (added)" if e.name in info.added else ""
        echo(f"{e.name}{mark}: {e.codec}, {_fmt_bytes(e.nbytes)}, {err}")
    for name in info.removed:
        echo(f"{name}: removed")
    full = sum(e.full_nbytes for e in info.entries)
    ratio = full / info.size if info.size else 0.0
    echo(
        f"{len(info.entries)} changed, {len(info.removed)} removed, {info.unchanged} unchanged; "
        f"patch {_fmt_bytes(info.size)} for {_fmt_bytes(full)} of changed tensors "
        f"({ratio:.1f}x) → {info.path}"
    )
    if info.scales is not None:
        _render_tuning(info.scales)
    if info.quality is not None:
        _render_check(info.quality)


def _num(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"


def _render_check(q: QualityReport) -> None:
    d = q.to_dict()
    echo("check: ‖decoded − target‖ / ‖target − base‖, / ‖target‖")
    for t in d["tensors"]:
        echo(
            f"  {t['name']}: {t['codec']}, {_num(t['rel_to_delta'])} of delta, "
            f"{_num(t['rel_to_target'])} of target"
        )
    s = d["summary"]
    if s["worst"] is not None:
        echo(
            f"worst {s['worst']} ({_num(s['worst_rel_to_delta'])}); weighted mean "
            f"{_num(s['weighted_rel_to_delta'])} of delta, {_num(s['weighted_rel_to_target'])} of "
            f"target; overall {_num(s['overall_rel_to_delta'])} of delta"
        )
    if q.outputs is not None:
        _render_outputs(q.outputs)


def _render_outputs(o: OutputChange) -> None:
    changed = ""
    if o.changed_predictions is not None:
        changed = f"; {o.changed_predictions} changed predictions ({o.changed_fraction:.1%})"
    echo(
        f"outputs ({o.output}, {o.examples} examples): cosine mean {o.mean_cosine:.6f}, "
        f"min {o.min_cosine:.6f}; max abs diff {o.max_abs_diff:.3g}{changed}"
    )


@patch.command("apply")
@click.argument("base")
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path())
@click.option("--scale", type=float, default=1.0, show_default=True, help="Scale lossy deltas.")
@click.option("--force", is_flag=True, help="Apply even to a base the patch was not made for.")
@click.option("--card", is_flag=True, help="Also write README.md next to an output file.")
@click.option("--base-model", help="base_model for the model card (default: BASE as given).")
@click.option(
    "--with",
    "with_base",
    metavar="ORIGINAL",
    help="Task patch of a tall_masks/emr merge: the merge's original base (default: recorded).",
)
@handle_errors
def apply_cmd(
    base: str,
    patch_file: str,
    out: str,
    scale: float,
    force: bool,
    card: bool,
    base_model: str | None,
    with_base: str | None,
) -> None:
    """Apply PATCH to BASE and write the result to -o (a directory when BASE is one)."""
    with ExitStack() as stack:
        src = stack.enter_context(open_model(base))
        original = None if with_base is None else stack.enter_context(open_model(with_base))
        directory = is_directory_ref(base, src)
        report = apply_patch(
            src,
            patch_file,
            out,
            scale=scale,
            force=force,
            directory=directory,
            card=card or directory,
            base_ref=base_model or base,
            with_base=original,
        )
    for warning in report.warnings:
        secho(f"potluck: WARNING: {warning}", err=True, fg="red", bold=True)
    checked = "results verified" if report.results_verified else "results not hash-checked"
    card_note = ", model card README.md" if report.card else ""
    echo(
        f"{len(report.changed)} changed, {len(report.added)} added, {len(report.removed)} "
        f"removed; {checked}{card_note} → {report.out_path}"
    )


@patch.command("stack")
@click.argument("parts", metavar="PATCH…", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--base", help="The first patch's base: lets lossy parts be re-encoded.")
@click.option("--codec", default="exact_xor", show_default=True, help="Codec for re-encoding.")
@click.option("--rule", "rules", multiple=True, help="GLOB=codec[:k=v,…] for re-encoding.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random codecs.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def stack_cmd(
    parts: tuple[str, ...],
    out: str,
    base: str | None,
    codec: str,
    rules: tuple[str, ...],
    seed: int,
    as_json: bool,
) -> None:
    """Compose PATCH… (each made against the previous one's result) into one patch."""
    if len(parts) < 2:
        raise UserError("patch stack needs at least two patches", hint="potluck patch stack P1 P2")
    parsed = [parse_rule(r) for r in rules]
    if base is None:
        report = stack_patches(parts, out, rules=parsed, default_codec=codec, seed=seed)
    else:
        with open_model(base) as src:
            report = stack_patches(
                parts, out, base=src, rules=parsed, default_codec=codec, seed=seed
            )
    if as_json:
        emit_json(vars(report))
        return
    for name, how in report.composed.items():
        err = report.errors.get(name)
        note = "" if err is None else f", rel.err {err:.3g} vs step-by-step"
        echo(f"{name}: {how} → {report.codecs.get(name, 'removed')}{note}")
    exact = "exact" if report.exact else "lossy"
    echo(
        f"{len(parts)} patches, {len(report.codecs)} tensors, {len(report.composed)} composed; "
        f"{exact} patch {_fmt_bytes(report.size)} → {report.path}"
    )


def _render_info(info: dict[str, Any]) -> None:
    echo(f"patch {info['path']}: {_fmt_bytes(info['size'])}, base {info['base_digest'][:16]}")
    for name, t in info["tensors"].items():
        err = t["error"]
        text = "exact" if err is None else f"rel.err {err['relative_error']:.3g}"
        if t.get("predicted_error") is not None:
            text += f" (predicted {t['predicted_error']:.3g})"
        params = ",".join(f"{k}={v}" for k, v in sorted(t["params"].items()))
        echo(f"  {name}: {t['codec']}[{params}] {_fmt_bytes(t['bytes'])}, {text}")
    for name in info["removed"]:
        echo(f"  {name}: removed")
    echo(
        f"{_fmt_bytes(info['full_bytes'])} of changed tensors, "
        f"compression {info['compression_ratio']:.1f}x, "
        f"{info['bits_per_parameter']:.4g} bits/parameter over {info['parameters']} parameters"
    )
    if info["description"]:
        echo(f"description: {json.dumps(info['description'], sort_keys=True)}")


@patch.command("info")
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@handle_errors
def info_cmd(patch_file: str, as_json: bool) -> None:
    """Show what PATCH changes: codecs, sizes, errors and the base it needs."""
    info = patch_info(patch_file)
    if as_json:
        emit_json(info)
    else:
        _render_info(info)


def parse_method_params(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"bad --param {item!r}", hint="write NAME=VALUE, e.g. density=0.2")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


@patch.command("rebase")
@click.argument("patch_file", metavar="PATCH", type=click.Path(exists=True, dir_okay=False))
@click.option("--onto", required=True, help="The new base (path or PATH@REV).")
@click.option("--old-base", help="The base PATCH was made against (default: found by its hashes).")
@click.option("--method", default="ta", show_default=True, help="Merge method (ta, ties, …).")
@click.option("--param", "params", multiple=True, help="Method parameter NAME=VALUE.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for random methods.")
@click.option("--codec", default="exact_xor", show_default=True, help="Codec of the new patch.")
@click.option("--rule", "rules", multiple=True, help="GLOB=codec[:k=v,…] for the new patch.")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def rebase_cmd(
    patch_file: str,
    onto: str,
    old_base: str | None,
    method: str,
    params: tuple[str, ...],
    seed: int,
    codec: str,
    rules: tuple[str, ...],
    out: str,
    as_json: bool,
) -> None:
    """Port PATCH to a new version of its base (three-way merge relative to the old base)."""
    from potluck.git.lineage import rebase_patch_in_repo

    report = rebase_patch_in_repo(
        patch_file, onto, out, old_base=old_base, method=method,
        params=parse_method_params(params), seed=seed, codec=codec,
        rules=tuple(parse_rule(r) for r in rules),
    )  # fmt: skip
    doc = {
        "path": report.out_path, "method": report.method, "params": report.params,
        "old_base_digest": report.old_base_digest, "new_base_digest": report.new_base_digest,
        "tensors": [dataclasses.asdict(t) for t in report.tensors],
        "conflicts": [t.name for t in report.conflicts], "base_only": report.base_only,
    }  # fmt: skip
    if as_json:
        emit_json(doc)
        return
    for t in report.tensors:
        sizes = "" if t.base_change is None else f" (base Δ {t.base_change:.3g}, "
        sizes += "" if t.patch_change is None else f"patch Δ {t.patch_change:.3g})"
        echo(f"  {t.name}: {t.status}: {t.resolution}{sizes}")
    echo(
        f"{len(report.tensors)} patched tensor(s), {len(report.conflicts)} conflict(s) resolved "
        f"by {report.method}, {report.base_only} changed by the base only → {report.out_path} "
        f"(pinned to {report.new_base_digest[:12]})"
    )
