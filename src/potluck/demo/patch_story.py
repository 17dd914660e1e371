"""The patch story: a contributor's fine-tune sent as a patch many times smaller than the
checkpoint, applied on another clone, and refused on the wrong base."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from potluck.demo.model import Params, lora_update, save_safetensors
from potluck.demo.shell import FILE, Log, Shell
from potluck.errors import IntegrityError
from potluck.git.inspect import load
from potluck.ops.patch import apply_patch, create_patch, patch_info

#: The contributor's codec rules: attention matrices as rank-4 factors (SVD); everything
#: else that changed (layer-norm gains) with the default exact codec.
RULES = [("*.attn.*", "lowrank", {"rank": 4})]


def _create(sh: Shell, work: Path, contrib: Params, log: Log) -> tuple[Path, dict[str, object]]:
    contrib_file = work / "contrib.safetensors"
    save_safetensors(contrib, contrib_file)
    patch = work / "contrib.patch"
    info = create_patch(
        sh.root / FILE,
        contrib_file,
        patch,
        rules=RULES,
        description={"author": "contributor", "task": "demo"},
    )
    full = (sh.root / FILE).stat().st_size
    ratio = full / info.size
    rule = "'*.attn.*=lowrank:rank=4'"
    log("\n$ (contributor) rank-4 update of every attention matrix, layer-norm gains tuned")
    log(f"$ potluck patch create {FILE} contrib.safetensors -o contrib.patch --rule {rule}")
    for codec in sorted({e.codec for e in info.entries}):
        es = [e for e in info.entries if e.codec == codec]
        err = max((e.relative_error or 0.0) for e in es)
        log(
            f"  {len(es):>2} tensors {codec:<10} {sum(e.nbytes for e in es) / 2**10:8.1f} KiB"
            + (f", declared rel. error ≤ {err:.2e}" if codec == "lowrank" else ", exact")
        )
    log(
        f"  patch {info.size / 2**20:.3f} MiB vs checkpoint {full / 2**20:.2f} MiB: "
        f"{ratio:.0f}x smaller ({info.unchanged} tensors unchanged, not stored)"
    )
    return patch, {"patch_bytes": info.size, "checkpoint_bytes": full, "patch_ratio": ratio}


def _verify(applied: Params, contrib: Params, patch: Path) -> tuple[int, int, bool]:
    """Exactly-coded tensors must equal the contributor's bit for bit; lossy ones must lie
    within the declared max |Δ̂ − Δ| plus the rounding of base + Δ̂ to float32 (two ulps)."""
    tensors = patch_info(patch)["tensors"]
    exact = lossy = 0
    ok = set(applied) == set(contrib)
    for name, want in contrib.items():
        got = applied[name]
        meta = tensors.get(name)
        if meta is None or meta["error"] is None:
            exact += meta is not None
            ok &= bool(np.array_equal(got, want))
            continue
        lossy += 1
        bound = meta["error"]["max_abs_error"] + 2 * np.spacing(np.abs(want))
        ok &= bool(np.all(np.abs(got.astype(np.float64) - want) <= bound))
    return exact, lossy, ok


def patch_story(
    sh: Shell, hub: Path, revs: dict[str, str], rng: np.random.Generator, log: Log
) -> dict[str, object]:
    """Create the patch in the demo repository, apply it in a fresh clone of ``hub``, verify,
    and show that applying it to another revision is refused."""
    work = sh.root.with_name(sh.root.name + "-patch")
    work.mkdir(exist_ok=True)
    contrib = lora_update(load(str(sh.root / FILE)), rng)
    patch, res = _create(sh, work, contrib, log)
    second = work / "second"
    sh.at(work)("git", "clone", "-q", str(hub), str(second))
    cs = sh.at(second)
    cs("potluck", "init")
    cs("potluck", "pull")
    log("$ git clone hub.git second && cd second && potluck init && potluck pull")
    out = second / FILE
    report = apply_patch(out, patch, out)
    exact, lossy, ok = _verify(load(str(out)), contrib, patch)
    log(f"$ potluck patch apply {FILE} ../contrib.patch -o {FILE}")
    log(
        f"  {exact} exact tensors equal the contributor's bit for bit (hash-checked: "
        f"{report.results_verified}); {lossy} lowrank tensors within the declared error: {ok}"
    )
    wrong = work / "model@v4.safetensors"
    save_safetensors(load(str(sh.root / FILE), rev=revs["v4"]), wrong)
    log("$ potluck patch apply model@v4.safetensors ../contrib.patch   (v4: before the merge)")
    try:
        apply_patch(wrong, patch, work / "never.safetensors")
        refused = ""
    except IntegrityError as e:
        refused = e.message
        log(f"  refused: IntegrityError: {e.message}")
    return dict(
        res,
        patch_root=str(work),
        patch_ok=ok,
        patch_exact=exact,
        patch_lossy=lossy,
        patch_hash_checked=report.results_verified,
        patch_refused=refused,
        wrong_base_written=(work / "never.safetensors").exists(),
    )
