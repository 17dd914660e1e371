"""The torch runtime of compositions (tiny random-init BERT built in the test) and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from modular_helpers import (
    dense_payload,
    ia3_payload,
    lowrank_payload,
    random_factors,
    save_st,
    write_expert,
)
from potluck.errors import IntegrityError, UserError
from potluck.modular import (
    ArrowRouter,
    PhatgooseRouter,
    RouteContext,
    SmearRouter,
    dense_weights,
    mix_outputs,
    smear_outputs,
)
from potluck.ops.compose.library import (
    AddOptions,
    add_expert,
    expert_deltas,
    find_expert,
    load_artifact,
    read_safetensors,
)
from potluck.ops.compose.manifest import load_composition
from potluck.ops.patch.apply import apply_patch
from tiny_models import save_tiny, tiny_bert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

H = 16
LAYERS = [
    f"encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")
]
QB0 = "encoder.layer.0.attention.self.query.bias"
VOCAB = [f"w{i}" for i in range(40)]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *VOCAB]
BERT = {"vocab_size": len(WORDS), "hidden_size": H, "max_position_embeddings": 32}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("modular")
    save_tiny(tiny_bert(0, **BERT), root / "base", WORDS)
    rng = np.random.default_rng(0)
    lib = root / "lib"
    for name in ("a", "b", "c"):
        payloads = {n: lowrank_payload(*random_factors(rng, 2, H, H, 0.5), (H, H)) for n in LAYERS}
        if name == "a":
            payloads[QB0] = dense_payload(rng.normal(size=H).astype(np.float32) * 0.2)
        write_expert(root / "base", root / f"{name}.patch", payloads)
        gates = {n: rng.normal(size=H).astype(np.float32) for n in LAYERS}
        save_st(root / f"{name}_gates.safetensors", gates)
        opts = AddOptions(
            tags=[f"task_{name}"], arrow=True, gates=str(root / f"{name}_gates.safetensors")
        )
        add_expert(lib, root / f"{name}.patch", name, "1.0", options=opts)
    router = {}
    for n in LAYERS:
        router[f"{n}/weight"] = rng.normal(size=(3, H)).astype(np.float32)
        router[f"{n}/bias"] = rng.normal(size=3).astype(np.float32)
    save_st(root / "router.safetensors", router)
    ids = torch.tensor([[2, 5, 9, 11, 3, 0], [2, 7, 7, 3, 0, 0], [2, 20, 21, 22, 23, 3]])
    mask = (ids != 0).long()
    return {"root": root, "ids": ids, "mask": mask}


def _manifest(root: Path, name: str, experts: list[str], router: str, agg: str = "output") -> Path:
    text = (
        f'base = "base"\nlibrary = "lib"\naggregation = "{agg}"\n'
        f"experts = {json.dumps(experts)}\n\n[router]\n{router}\n"
    )
    (root / name).write_text(text)
    return root / name


def _hidden(model: Any, w: dict[str, Any], **kw: Any) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=w["ids"], attention_mask=w["mask"], **kw)
    return out.last_hidden_state.numpy()


def _patched(root: Path, patch: Path, out: str) -> Any:
    if not (root / out).exists():
        apply_patch(root / "base", patch, root / out)
    return transformers.BertModel.from_pretrained(root / out).eval()


def test_one_expert_with_weight_one_equals_the_patched_base(world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    composed = compose(_manifest(root, "one.toml", ["a"], 'strategy = "uniform"'))
    got = _hidden(composed, world)
    want = _hidden(_patched(root, root / "a.patch", "patched_a"), world)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    base = _hidden(transformers.BertModel.from_pretrained(root / "base").eval(), world)
    assert np.abs(got - base).max() > 1e-2  # the expert really changes the output
    trace = composed.route_trace()
    assert sorted(trace) == sorted(n.removesuffix(".weight") for n in LAYERS)
    entry = trace["encoder.layer.0.attention.self.query"]
    assert entry["experts"] == ["a"] and entry["weights"].tolist() == [[1.0]] * 18


def test_ia3_expert_equals_the_patched_base(world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    rng = np.random.default_rng(3)
    q, v = LAYERS[0], LAYERS[1]
    payloads = {
        q: ia3_payload(rng.uniform(0.5, 1.5, H).astype(np.float32), (H, H), 0),
        v: ia3_payload(rng.uniform(0.5, 1.5, H).astype(np.float32), (H, H), 1),
        QB0: ia3_payload(rng.uniform(0.5, 1.5, H).astype(np.float32), (H,), 0),
    }
    write_expert(root / "base", root / "i.patch", payloads)
    add_expert(root / "lib_ia3", root / "i.patch", "i", "1")
    m = _manifest(root, "ia3.toml", ["i"], 'strategy = "uniform"')
    m.write_text(m.read_text().replace('library = "lib"', 'library = "lib_ia3"'))
    composed = compose(m)
    want = _hidden(_patched(root, root / "i.patch", "patched_i"), world)
    np.testing.assert_allclose(_hidden(composed, world), want, rtol=0, atol=2e-5)
    info = composed.to_patch(root / "i_mix.patch", {"i": 1.0})
    assert info["tensors"] == sorted([q, v, QB0])
    again = _hidden(_patched(root, root / "i_mix.patch", "patched_i_mix"), world)
    np.testing.assert_allclose(again, want, rtol=0, atol=1e-6)


def test_to_patch_and_disable(world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    composed = compose(_manifest(root, "two.toml", ["a", "b"], 'strategy = "uniform"\ntop_k = 2'))
    got = _hidden(composed, world)
    info = composed.to_patch(root / "mix.patch")
    assert info["weights"] == {"a": 0.5, "b": 0.5}
    want = _hidden(_patched(root, root / "mix.patch", "patched_mix"), world)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    composed.disable("b")
    only_a = _hidden(_patched(root, root / "a.patch", "patched_a"), world)
    np.testing.assert_allclose(_hidden(composed, world), only_a, rtol=0, atol=2e-5)
    with pytest.raises(UserError, match="no expert 'b' in the composition"):
        composed.disable("b")
    with pytest.raises(UserError, match="cannot disable the last expert"):
        composed.disable("a")


def test_static_weights_disable_renormalises(world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    router = 'strategy = "static"\nweights = { a = 0.6, b = -0.2, c = 0.4 }'
    composed = compose(_manifest(root, "static.toml", ["a", "b", "c"], router))
    composed.disable("c")
    assert composed.static == pytest.approx({"a": 1.2, "b": -0.4})
    got = _hidden(composed, world)
    info = composed.to_patch(root / "static.patch")
    assert info["weights"] == composed.static
    want = _hidden(_patched(root, root / "static.patch", "patched_static"), world)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    entry = composed.route_trace()["encoder.layer.0.attention.self.query"]
    assert entry["experts"] == ["a", "b"]
    np.testing.assert_allclose(entry["weights"], [[1.2, -0.4]] * 18, rtol=1e-12)


def _capture(composed: Any) -> dict[str, list[np.ndarray]]:
    seen: dict[str, list[np.ndarray]] = {}

    def hook(name: str) -> Any:
        def fn(_mod: Any, args: Any, out: Any) -> None:
            x = args[0].reshape(-1, H).double().numpy()
            seen[name] = [x, out.reshape(-1, H).double().numpy()]

        return fn

    for name, c in composed.containers.items():
        c.base.register_forward_hook(hook(name))
        c.register_forward_hook(
            lambda m, a, o, n=name: seen[n].append(o.reshape(-1, H).double().numpy())
        )
    return seen


CASES = {
    "arrow-output": ('strategy = "arrow"\ntop_k = 2\ntemperature = 0.5', "output"),
    "arrow-smear-mix": ('strategy = "arrow"\ntop_k = 2\ntemperature = 0.5', "parameters"),
    "phatgoose-example": ('strategy = "phatgoose"\ngranularity = "example"', "output"),
    "smear-example": (
        'strategy = "smear"\ngranularity = "example"\nweights_file = "router.safetensors"',
        "parameters",
    ),
}


def _reference_router(case: str, comp: Any, weight: str, root: Path) -> Any:
    if case.startswith("arrow"):
        protos = np.stack([load_artifact(r, "arrow")[weight] for r in comp.experts])
        return ArrowRouter(protos, top_k=2, temperature=0.5)
    if case.startswith("phatgoose"):
        gates = np.stack([load_artifact(r, "phatgoose")[weight] for r in comp.experts])
        return PhatgooseRouter(gates, granularity="example")
    arrays = read_safetensors(root / "router.safetensors")[1]
    return SmearRouter(arrays[f"{weight}/weight"], arrays[f"{weight}/bias"], granularity="example")


@pytest.mark.parametrize("case", sorted(CASES))
def test_routing_matches_numpy_reference(world: dict[str, Any], case: str) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    router, aggregation = CASES[case]
    m = _manifest(root, f"{case}.toml", ["a", "b", "c"], router, aggregation)
    composed = compose(m)
    seen = _capture(composed)
    _hidden(composed, world)
    comp = load_composition(m)
    deltas = [expert_deltas(r.patch_path) for r in comp.experts]
    assert sorted(composed.route_trace()) == sorted(n.removesuffix(".weight") for n in LAYERS)
    for module, entry in composed.route_trace().items():
        weight = f"{module}.weight"
        x, base_out, got = seen[module]
        ctx = RouteContext(example_index=entry["examples"])
        idx, w = _reference_router(case, comp, weight, root).select(x, ctx)
        assert entry["indices"].tolist() == idx.tolist()
        np.testing.assert_allclose(entry["weights"], w, rtol=1e-5)
        a = np.stack([d[weight].a for d in deltas]).astype(np.float64)
        b = np.stack([d[weight].b for d in deltas]).astype(np.float64)
        dense = dense_weights(idx, w, 3)
        ref = (smear_outputs if aggregation == "parameters" else mix_outputs)(x, a, b, dense)
        if module.endswith("layer.0.attention.self.query"):
            ref = ref + dense[:, :1] * deltas[0][QB0].delta[None, :]
        np.testing.assert_allclose(got - base_out, ref, rtol=0, atol=3e-5)
    if "example" in case:  # every token of an example got the same experts
        entry = composed.route_trace()["encoder.layer.1.attention.self.value"]
        for e in range(3):
            rows = entry["indices"][entry["examples"] == e]
            assert (rows == rows[0]).all()


def test_stale_artifacts_and_base_mismatch_are_refused(world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import compose

    root = world["root"]
    shutil.copytree(root / "base", root / "base2")
    m = _manifest(root, "moved.toml", ["a", "b"], 'strategy = "uniform"')
    m.write_text(m.read_text().replace('base = "base"', 'base = "base2"'))
    from potluck.ops.compose.manifest import lock_manifest, write_lock

    write_lock(root / "moved.lock", lock_manifest(m))
    with open_st(root / "base2" / "model.safetensors") as tensors:
        tensors[LAYERS[1]] = tensors[LAYERS[1]] + 1
    with pytest.raises(
        IntegrityError,
        match=r"expert a@1\.0 was made for another base: "
        r"'encoder\.layer\.0\.attention\.self\.value\.weight'",
    ):
        compose(root / "moved.lock")
    lib2 = root / "lib2"
    shutil.copytree(root / "lib", lib2)
    rec_b = find_expert(lib2, "b")
    shutil.copyfile(
        find_expert(lib2, "c").path / "artifacts" / "arrow.safetensors",
        rec_b.path / "artifacts" / "arrow.safetensors",
    )
    m2 = _manifest(root, "stale.toml", ["a", "b"], 'strategy = "arrow"')
    m2.write_text(m2.read_text().replace('library = "lib"', 'library = "lib2"'))
    with pytest.raises(IntegrityError, match=r"expert b@1\.0: the arrow artifact is stale"):
        compose(m2)


class open_st:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> dict[str, np.ndarray]:
        from potluck.ops.compose.library import read_safetensors

        self.tensors = read_safetensors(self.path)[1]
        return self.tensors

    def __exit__(self, *exc: object) -> None:
        save_st(self.path, self.tensors)


def test_cli_experts_and_compose(world: dict[str, Any], tmp_path: Path) -> None:
    from potluck.cli import modular_cmd  # noqa: F401 - registers the commands
    from potluck.cli.main import cli

    root = world["root"]
    run = CliRunner().invoke
    lib = str(tmp_path / "lib")
    r = run(
        cli,
        [
            "experts",
            "add",
            str(root / "a.patch"),
            "-L",
            lib,
            "--name",
            "a",
            "--version",
            "1.0",
            "--base",
            str(root / "base"),
            "--tag",
            "task_a",
            "--eval",
            "acc=0.5",
            "--arrow",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["name"] == "a" and data["evals"] == {"acc": 0.5} and "arrow" in data["artifacts"]
    r = run(
        cli, ["experts", "add", str(root / "b.patch"), "-L", lib, "--name", "b", "--version", "2"]
    )
    assert r.exit_code == 0, r.output
    r = run(cli, ["experts", "list", "-L", lib, "--json"])
    assert [(e["name"], e["version"]) for e in json.loads(r.output)] == [("a", "1.0"), ("b", "2")]
    r = run(cli, ["experts", "show", "b@>=2", "-L", lib, "--json"])
    assert json.loads(r.output)["patch"]["sha256"] == find_expert(lib, "b").sha256
    r = run(cli, ["experts", "verify", "-L", lib, "--base", str(root / "base"), "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == {"ok": True, "problems": []}
    (Path(lib) / "experts" / "b" / "2" / "expert.patch").write_bytes(
        (root / "a.patch").read_bytes()
    )
    r = run(cli, ["experts", "verify", "-L", lib])
    assert r.exit_code == 3 and r.output.startswith("b@2: patch sha256 ")
    shutil.copytree(root / "lib", tmp_path / "lib_ok")
    shutil.copytree(root / "base", tmp_path / "base")
    m = _manifest(tmp_path, "c.toml", ["a", "b"], 'strategy = "oracle"')
    m.write_text(m.read_text().replace('library = "lib"', 'library = "lib_ok"'))
    r = run(cli, ["compose", "lock", str(m)])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == f"locked a@1.0, b@1.0 → {tmp_path / 'c.lock'}"
    r = run(
        cli,
        [
            "compose",
            "run",
            str(tmp_path / "c.lock"),
            "--input",
            "w1 w2 w3",
            "--input",
            "w4",
            "--task",
            "task_b",
            "--task",
            "task_a",
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert [o["experts"] for o in out] == [{"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 0.0}]
    r = run(cli, ["compose", "run", str(tmp_path / "c.lock"), "--input", "w1", "--task", "nope"])
    assert r.exit_code == 2 and "no expert serves task 'nope'" in r.output


CLS_LAYERS = [f"bert.{n}" for n in LAYERS]


@pytest.fixture(scope="module")
def cls_world(world: dict[str, Any]) -> dict[str, Any]:
    root = world["root"]
    save_tiny(tiny_bert(1, **BERT, num_labels=2, classifier=True), root / "cls", WORDS)
    rng = np.random.default_rng(5)
    payloads = {n: lowrank_payload(*random_factors(rng, 2, H, H, 0.5), (H, H)) for n in CLS_LAYERS}
    write_expert(root / "cls", root / "g.patch", payloads)
    rec = add_expert(root / "lib_cls", root / "g.patch", "g", "1.0")
    rows = [{"text": f"w{i} w{i + 1} w{(3 * i) % 40}", "label": i % 2} for i in range(12)]
    return {"root": root, "rec": rec, "rows": rows}


def _cls_model(path: Path, double: bool = False) -> Any:
    model = transformers.BertForSequenceClassification.from_pretrained(path).eval()
    return model.double() if double else model


def test_gated_expert_at_zero_gate_is_the_half_scaled_patch(
    world: dict[str, Any], cls_world: dict[str, Any]
) -> None:
    from potluck.ops.compose.runtime import gate_expert

    root = cls_world["root"]
    model = _cls_model(root / "cls")
    gated = gate_expert(model, cls_world["rec"])
    assert sorted(gated) == sorted(CLS_LAYERS)
    apply_patch(root / "cls", root / "g.patch", root / "cls_half", scale=0.5)
    want_model = _cls_model(root / "cls_half")
    with torch.no_grad():
        got = model(input_ids=world["ids"], attention_mask=world["mask"]).logits
        want = want_model(input_ids=world["ids"], attention_mask=world["mask"]).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=2e-5)


def test_train_gates_sgd_step_matches_finite_differences(cls_world: dict[str, Any]) -> None:
    from potluck.ops.compose.runtime import gate_expert, load_tokenizer, text_batches, train_gates

    root, rec = cls_world["root"], cls_world["rec"]
    batches = text_batches(load_tokenizer(str(root / "cls")), cls_world["rows"], 12)
    lr = 0.1
    gates = train_gates(
        _cls_model(root / "cls", True), rec, batches, steps=1, lr=lr, optimizer="sgd"
    )
    ref = _cls_model(root / "cls", True)
    ref_gates = gate_expert(ref, rec)
    eps = 1e-4

    def loss() -> float:
        with torch.no_grad():
            return float(ref(**batches[0]).loss)

    for name, j in ((CLS_LAYERS[0], 3), (CLS_LAYERS[3], 11)):
        g = ref_gates[name].gate.data
        g[j] = eps
        up = loss()
        g[j] = -eps
        down = loss()
        g[j] = 0.0
        assert gates[name][j] == pytest.approx(-lr * (up - down) / (2 * eps), rel=1e-6)


def test_cli_train_gate_attaches_fresh_gates(cls_world: dict[str, Any], tmp_path: Path) -> None:
    from potluck.cli import modular_cmd  # noqa: F401 - registers the commands
    from potluck.cli.main import cli
    from potluck.ops.compose.runtime import load_tokenizer, text_batches, train_gates

    root = cls_world["root"]
    lib = tmp_path / "lib"
    shutil.copytree(root / "lib_cls", lib)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in cls_world["rows"]) + "\n")
    args = [
        "experts",
        "train-gate",
        "g",
        "-L",
        str(lib),
        "--base",
        str(root / "cls"),
        "--data",
        str(data),
        "--steps",
        "3",
        "--batch-size",
        "4",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "g@1.0: 4 gate(s) trained on 12 example(s), 3 step(s)"
    rec = find_expert(lib, "g")
    stored = load_artifact(rec, "phatgoose")
    batches = text_batches(load_tokenizer(str(root / "cls")), cls_world["rows"], 4)
    want = train_gates(_cls_model(root / "cls"), rec, batches, steps=3, lr=1e-2)
    assert sorted(stored) == sorted(want)
    for name in want:
        np.testing.assert_allclose(stored[name], want[name], rtol=0, atol=1e-7)
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and "expert g@1.0 already has a phatgoose artifact" in r.output
