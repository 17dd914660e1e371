"""Patches on model directories and revisions, model cards, --check and error cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import potluck.cli.commands
import potluck.cli.patch_cmd  # noqa: F401  (registers `potluck patch`)
from conftest import Run
from potluck.cli.main import cli
from potluck.codecs import Payload
from potluck.errors import FormatError, IntegrityError
from potluck.formats import scan_file
from potluck.objects.manifest import MAGIC
from potluck.ops.lineage import weights_digest_of
from potluck.ops.patch.apply import apply_patch
from potluck.ops.patch.check import measure, summarize
from potluck.ops.patch.create import create_patch, patch_info
from potluck.ops.patch.fileformat import PatchContents, read_patch, write_patch
from potluck.ops.patch.output import plan_output

Arrays = dict[str, np.ndarray]
SHARDS = {
    "model-00001-of-00002.safetensors": ["embed", "layers.0.attn", "layers.0.norm"],
    "model-00002-of-00002.safetensors": ["layers.1.attn", "layers.1.mlp", "lm_head"],
}
CONFIG = {"config.json": b'{"model_type": "toy"}\n', "tokenizer.json": b'{"v": 1}\n'}


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def weights(rng: np.random.Generator) -> Arrays:
    shapes = {
        "embed": (20, 8),
        "layers.0.attn": (8, 8),
        "layers.0.norm": (8,),
        "layers.1.attn": (8, 8),
        "layers.1.mlp": (16, 8),
        "lm_head": (20, 8),
    }
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}


def save_dir(d: Path, arrays: Arrays) -> Path:
    d.mkdir(parents=True)
    weight_map = {}
    for fname, names in SHARDS.items():
        save_file({n: arrays[n] for n in names}, str(d / fname))
        weight_map.update(dict.fromkeys(names, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    for name, data in CONFIG.items():
        (d / name).write_bytes(data)
    return d


def finetune(base: Arrays, rng: np.random.Generator) -> Arrays:
    out = dict(base)
    for n in ("layers.0.attn", "layers.1.attn"):
        u, v = rng.standard_normal((8, 2)), rng.standard_normal((2, 8))
        out[n] = (base[n] + 0.01 * (u @ v)).astype(np.float32)
    out["layers.1.mlp"] = base["layers.1.mlp"] + 0.02 * rng.standard_normal((16, 8)).astype(
        np.float32
    )
    return out


@pytest.fixture
def dirs(tmp_path: Path, rng: np.random.Generator) -> tuple[Path, Path, Arrays]:
    base = weights(rng)
    target = finetune(base, rng)
    return save_dir(tmp_path / "base", base), save_dir(tmp_path / "target", target), target


def front_matter(text: str) -> list[str]:
    assert text.startswith("---\n")
    return text.split("---\n")[1].splitlines()


def test_directory_in_directory_out(dirs: tuple[Path, Path, Arrays], tmp_path: Path) -> None:
    base, target, want = dirs
    patch = tmp_path / "p.patch"
    runner = CliRunner()
    res = runner.invoke(
        cli, ["patch", "create", str(base), str(target), "-o", str(patch), "--author", "ann"]
    )
    assert res.exit_code == 0, res.output
    assert "3 changed, 0 removed, 3 unchanged" in res.output
    out = tmp_path / "out"
    res = runner.invoke(cli, ["patch", "apply", str(base), str(patch), "-o", str(out)])
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        [*SHARDS, *CONFIG, "model.safetensors.index.json", "README.md", "lineage.json"]
    )
    for fname, tensors in SHARDS.items():
        got = load_file(str(out / fname))
        assert list(got) == tensors
        assert all(sha(got[n]) == sha(want[n]) for n in tensors)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    base_index = json.loads((base / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for name, data in CONFIG.items():
        assert (out / name).read_bytes() == data
    card = (out / "README.md").read_text()
    assert front_matter(card) == [
        f"base_model: {json.dumps(str(base))}",
        "base_model_relation: finetune",
        "tags:",
        "- potluck",
        "potluck_lineage:",  # the base pinned by weights digest (docs/lineage.md)
        "  relation: patch",
        "  method: patch",
        "  parents:",
        f"  - weights_digest: {weights_digest_of(base)}",
        f"    ref: {json.dumps(str(base))}",
    ]
    assert f"patch sha256: `{hashlib.sha256(patch.read_bytes()).hexdigest()}`" in card
    assert "- author: ann" in card and "exact_xor (3 tensors)" in card and "exact: yes" in card
    # an existing, non-empty output directory is refused before anything is written
    res = runner.invoke(cli, ["patch", "apply", str(base), str(patch), "-o", str(out)])
    assert res.exit_code == 2 and "not an empty directory" in res.output
    res = runner.invoke(cli, ["patch", "apply", str(base), str(patch), "-o", f"{out}.safetensors"])
    assert res.exit_code == 2 and "the output is a directory too" in res.output
    assert not Path(f"{out}.safetensors").exists()


def test_lowrank_card_is_adapter_and_file_card(
    dirs: tuple[Path, Path, Arrays], tmp_path: Path
) -> None:
    base, target, _ = dirs
    patch = tmp_path / "p.patch"
    create_patch(
        base,
        target,
        patch,
        rules=[("*attn", "lowrank", {"rank": 2})],
        tensors_glob="*attn",
        description={"task": "demo"},
    )
    assert patch_info(patch)["relation"] == "adapter"
    one = tmp_path / "single"
    one.mkdir()
    (one / "README.md").write_text("my own notes\n")
    args = ["patch", "apply", str(base / "model-00002-of-00002.safetensors"), str(patch)]
    args += ["-o", str(one / "m.safetensors"), "--card", "--base-model", "org/base"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2 and "not written by potluck" in res.output
    assert sorted(p.name for p in one.iterdir()) == ["README.md"]
    (one / "README.md").unlink()
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 3 and "layers.0.attn" in res.output  # that shard lacks it
    other = tmp_path / "other"
    other.mkdir()
    save_file(load_file(str(base / "model-00001-of-00002.safetensors")), str(other / "a.st"))
    create_patch(
        other / "a.st",
        target / "model-00001-of-00002.safetensors",
        patch,
        default_codec="lowrank",
        params={"rank": 2},
        tensors_glob="*attn",
    )
    args = ["patch", "apply", str(other / "a.st"), str(patch), "-o", str(one / "m.safetensors")]
    res = CliRunner().invoke(cli, [*args, "--card", "--base-model", "org/base"])
    assert res.exit_code == 0, res.output
    card = (one / "README.md").read_text()
    assert front_matter(card)[:2] == ['base_model: "org/base"', "base_model_relation: adapter"]
    assert "lowrank (1 tensor)" in card and "exact: no" in card
    assert sorted(p.name for p in one.iterdir()) == [
        "README.md", "m.safetensors", "m.safetensors.lineage.json"
    ]  # fmt: skip


def test_check_matches_float64_reference(dirs: tuple[Path, Path, Arrays], tmp_path: Path) -> None:
    base, target, want = dirs
    patch = tmp_path / "p.patch"
    args = ["patch", "create", str(base), str(target), "-o", str(patch), "--check"]
    args += ["--codec", "quant", "--bits", "4", "--rule", "*attn=lowrank:rank=1"]
    res = CliRunner().invoke(cli, [*args, "--json"])
    assert res.exit_code == 0, res.output
    check = json.loads(res.output)["check"]
    apply_patch(base, patch, tmp_path / "out")
    old = {n: a for f in SHARDS for n, a in load_file(str(base / f)).items()}
    got = {n: a for f in SHARDS for n, a in load_file(str(tmp_path / "out" / f)).items()}
    rows = {t["name"]: t for t in check["tensors"]}
    assert sorted(rows) == ["layers.0.attn", "layers.1.attn", "layers.1.mlp"]
    ref: dict[str, tuple[float, float]] = {}
    for name, row in rows.items():
        err = sum(
            (float(g) - float(w)) ** 2 for g, w in zip(got[name].flat, want[name].flat, strict=True)
        )
        dlt = sum(
            (float(w) - float(o)) ** 2 for w, o in zip(want[name].flat, old[name].flat, strict=True)
        )
        tgt = sum(float(w) ** 2 for w in want[name].flat)
        ref[name] = (np.sqrt(err / dlt), np.sqrt(err / tgt))
        assert row["rel_to_delta"] == pytest.approx(ref[name][0], rel=1e-9)
        assert row["rel_to_target"] == pytest.approx(ref[name][1], rel=1e-9)
    summary = check["summary"]
    assert summary["worst"] == max(ref, key=lambda n: ref[n][0])
    sizes = {n: want[n].size for n in ref}
    mean = sum(sizes[n] * ref[n][0] for n in ref) / sum(sizes.values())
    assert summary["weighted_rel_to_delta"] == pytest.approx(mean, rel=1e-9)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0 and f"worst {summary['worst']}" in res.output


def test_truncated_tampered_and_unknown_codec(
    dirs: tuple[Path, Path, Arrays], tmp_path: Path
) -> None:
    base, target, _ = dirs
    patch = tmp_path / "p.patch"
    create_patch(base, target, patch, description={"author": "ann"})
    data = patch.read_bytes()
    out = tmp_path / "out"
    (tmp_path / "cut.patch").write_bytes(data[:-10])
    with pytest.raises(FormatError, match="truncated"):
        apply_patch(base, tmp_path / "cut.patch", out)
    forged = data.replace(b'{\\"author\\":\\"ann\\"}', b'{\\"author\\":\\"bob\\"}')
    assert forged != data
    (tmp_path / "forged.patch").write_bytes(forged)
    with pytest.raises(IntegrityError, match="does not match its digest"):
        apply_patch(base, tmp_path / "forged.patch", out)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    (tmp_path / "flipped.patch").write_bytes(bytes(flipped))
    with pytest.raises(IntegrityError, match="does not match its digest"):
        apply_patch(base, tmp_path / "flipped.patch", out)
    c = read_patch(patch)
    p = c.payloads["layers.1.mlp"]
    c.payloads["layers.1.mlp"] = Payload("zfancy", p.arrays, p.meta, None)
    write_patch(tmp_path / "odd.patch", PatchContents(c.payloads, c.base, c.result))
    with pytest.raises(FormatError, match=r"'layers\.1\.mlp' uses unknown codec 'zfancy'"):
        apply_patch(base, tmp_path / "odd.patch", out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_wrong_base_directory_writes_nothing(
    dirs: tuple[Path, Path, Arrays], tmp_path: Path
) -> None:
    base, target, _ = dirs
    create_patch(base, target, tmp_path / "p.patch")
    with pytest.raises(IntegrityError, match=r"3 tensor\(s\) differ \('layers.0.attn', 'layers.1"):
        apply_patch(target, tmp_path / "p.patch", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_revisions_and_tracked_patches(
    repo: Path, git: Run, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(repo)

    def potluck(*args: str) -> str:
        res = CliRunner().invoke(cli, list(args))
        assert res.exit_code == 0, res.output
        return res.stdout

    base = weights(rng)
    target = finetune(base, rng)
    save_dir(repo / "models" / "m", base)
    save_file(base, str(repo / "base.safetensors"))
    git("potluck", "track", "*.patch")
    git("git", "add", ".")
    git("git", "commit", "-q", "-m", "v1")
    git("git", "tag", "v1")
    save_file(target, str(repo / "base.safetensors"))  # the work tree moves on
    save_dir(repo / "t", target)
    potluck("patch", "create", "base.safetensors@v1", "base.safetensors", "-o", "a.patch")
    git("git", "add", "a.patch")
    git("git", "commit", "-q", "-m", "patch")
    assert git("git", "cat-file", "-p", "HEAD:a.patch").encode().startswith(MAGIC)
    potluck("patch", "apply", "base.safetensors@v1", "a.patch", "-o", "out.safetensors")
    got = load_file(str(repo / "out.safetensors"))
    assert all(sha(got[n]) == sha(target[n]) for n in target)
    potluck("patch", "apply", "models/m@v1", "a.patch", "-o", "outdir")
    assert sorted(p.name for p in (repo / "outdir").iterdir()) == sorted(
        [*SHARDS, *CONFIG, "model.safetensors.index.json", "README.md", "lineage.json"]
    )
    assert 'base_model: "models/m@v1"' in (repo / "outdir" / "README.md").read_text()
    # a second version of the patch: `potluck diff` names the payload arrays that changed
    old_segs = {s.name: s for s in scan_file(repo / "a.patch").tensor_segments()}
    old_bytes = (repo / "a.patch").read_bytes()
    potluck(
        "patch",
        "create",
        "base.safetensors@v1",
        "base.safetensors",
        "-o",
        "a.patch",
        "--rule",
        "layers.1.mlp=quant:bits=8",
    )
    git("git", "commit", "-q", "-am", "patch v2")
    new_bytes = (repo / "a.patch").read_bytes()
    segs = {s.name: s for s in scan_file(repo / "a.patch").tensor_segments()}
    want = {
        n: "added" if n not in old_segs else "removed" if n not in segs else "changed"
        for n in set(old_segs) | set(segs)
        if n not in old_segs
        or n not in segs
        or old_bytes[old_segs[n].offset : old_segs[n].offset + old_segs[n].length]
        != new_bytes[segs[n].offset : segs[n].offset + segs[n].length]
    }
    assert want and set(want) <= {n for n in set(old_segs) | set(segs) if "layers.1.mlp" in n}
    diff = json.loads(potluck("diff", "HEAD~1", "HEAD", "--no-stats", "--json", "a.patch"))
    assert {c["name"]: c["status"] for c in diff[0]["changes"]} == want


def test_pytorch_shards_become_safetensors_shards() -> None:
    order = [("a", "F32", (2,)), ("b", "F16", (1, 3)), ("new", "I64", ())]
    files = {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}
    plan = plan_output(order, files, directory=True, had_index=False)
    assert plan.shards == {
        "model-00001-of-00002.safetensors": [("a", "F32", (2,))],
        "model-00002-of-00002.safetensors": [("b", "F16", (1, 3)), ("new", "I64", ())],
    }
    assert plan.index
    one = plan_output(order[:1], {"a": "model.safetensors"}, directory=True, had_index=False)
    assert one.shards == {"model.safetensors": [("a", "F32", (2,))]} and not one.index


def test_measure_closed_form() -> None:
    base = np.array([0.0, 0.0, 0.0], np.float32)
    target = np.array([3.0, 4.0, 0.0], np.float32)
    decoded = np.array([3.0, 4.0, 1.0], np.float32)
    q = measure("t", "x", decoded, target, base)
    assert (q.rel_to_delta, q.rel_to_target) == (0.2, 0.2)  # ‖(0,0,1)‖ / ‖(3,4,0)‖
    nan = np.array([np.nan, 1.0], np.float32)
    exact = measure("n", "exact_xor", nan.copy(), nan, np.zeros(2, np.float32))
    assert exact.error_norm == 0.0
    report = summarize([q, measure("z", "x", target, target, None)])
    assert report.worst is not None and report.worst.name == "t"
    assert report.weighted("rel_to_delta") == pytest.approx(0.1)
    assert report.overall_rel_to_delta == pytest.approx(1 / np.sqrt(50))
