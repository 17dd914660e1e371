"""The routing story (needs torch): two community experts composed, routed per token by Arrow.

A tiny torch encoder (``embed`` → ``layer0`` → tanh → ``layer1``, width 32) over two word
families, colours and animals; like a pre-trained encoder that keeps topics apart, the base
keeps the families in separate halves of its hidden space. Two contributors each train a rank-2
LoRA of both linears on sentences of their own family only, ship it as a potluck patch and add
it to an expert library with Arrow prototypes. A composition manifest (Arrow, top-1, per
token) is locked to their hashes, composed over the base with
``potluck.ops.compose.runtime.compose`` and run on pure and mixed sentences; the story prints,
per token, the expert each layer routed it to.

torch is imported inside the functions; ``potluck.demo`` calls ``routing_story`` only when torch
can be imported.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from potluck.codecs import factors_payload
from potluck.formats.safetensors import write_safetensors
from potluck.ops.compose import AddOptions, add_expert, lock_manifest, write_lock
from potluck.ops.models import open_path
from potluck.ops.patch import PatchContents, write_patch
from potluck.tensors.digests import tensor_sha256
from potluck.tensors.dtypes import from_numpy

Log = Callable[[str], None]

#: The two word families; token ids are 1 + the index in ``WORDS`` (0 is padding).
FAMILIES = {
    "colours": ["red", "green", "blue", "amber", "violet", "teal"],
    "animals": ["cat", "dog", "owl", "fox", "yak", "eel"],
}
WORDS = [w for ws in FAMILIES.values() for w in ws]
WIDTH = 32
RANK = 2
LR = 0.5
LAYERS = ("layer0", "layer1")
#: What the composed model is asked to route.
INPUTS = ("red green blue", "cat dog owl", "teal fox", "owl violet amber")


def token_ids(text: str) -> list[int]:
    """Word ids of a sentence (1-based; 0 is padding)."""
    return [1 + WORDS.index(w) for w in text.split()]


def base_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The tiny base: embedding [13, 32], two linears (weights, zero biases), float32.

    Like a pre-trained encoder that keeps topics apart, it keeps the two families in separate
    halves of its 32-dim space: colour words embed in the first 16 dims, animals in the last
    16, and both weight matrices are block-diagonal.
    """
    half, n = WIDTH // 2, len(FAMILIES["colours"])
    emb = np.zeros((len(WORDS) + 1, WIDTH))
    emb[1 : 1 + n, :half] = rng.normal(size=(n, half))
    emb[1 + n :, half:] = rng.normal(size=(len(WORDS) - n, half))
    p: dict[str, np.ndarray] = {"embed.weight": emb}
    for name in LAYERS:
        w = np.zeros((WIDTH, WIDTH))
        for blk in (slice(0, half), slice(half, WIDTH)):
            w[blk, blk] = rng.normal(size=(half, half)) / np.sqrt(half)
        p[f"{name}.weight"] = w
        p[f"{name}.bias"] = np.zeros(WIDTH)
    return {k: v.astype(np.float32) for k, v in p.items()}


def reference_forward(
    p: dict[str, np.ndarray],
    ids: list[int],
    deltas: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """float64 numpy forward of the tiny encoder, optionally with dense weight deltas added."""
    d = deltas or {}
    x = p["embed.weight"].astype(np.float64)[ids]
    for i, name in enumerate(LAYERS):
        w = p[f"{name}.weight"].astype(np.float64) + d.get(f"{name}.weight", 0.0)
        x = x @ w.T + p[f"{name}.bias"]
        if i == 0:
            x = np.tanh(x)
    out: np.ndarray = x
    return out


def _encoder_class() -> type[Any]:
    import torch
    from torch import nn

    class TinyEncoder(nn.Module):  # type: ignore[misc]
        """embed → layer0 → tanh → layer1; returns the hidden states [B, T, WIDTH]."""

        def __init__(self, p: dict[str, np.ndarray]) -> None:
            super().__init__()
            self.embed = nn.Embedding(len(WORDS) + 1, WIDTH)
            self.layer0, self.layer1 = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
            self.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in p.items()})

        def forward(self, input_ids: Any, attention_mask: Any = None) -> Any:
            return self.layer1(torch.tanh(self.layer0(self.embed(input_ids))))

    return TinyEncoder


def train_expert(
    p: dict[str, np.ndarray], family: str, rng: np.random.Generator, steps: int = 60
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A contributor's rank-2 LoRA of both layers, trained on its family's sentences only.

    Target: a fixed random vector per word of the family, in the family's half of the output
    (MSE). Standard LoRA start (A small random, B zero), plain gradient descent written out
    (``torch.optim`` imports torch's compiler stack: seconds). Returns {layer: (A, B)}.
    """
    import torch

    torch.manual_seed(int(rng.integers(2**31)))
    enc = _encoder_class()(p).eval()
    for q in enc.parameters():
        q.requires_grad_(False)
    fam = list(FAMILIES).index(family)
    half = WIDTH // 2
    params = [torch.randn(RANK, WIDTH) * 0.01 for _ in LAYERS] + [
        torch.zeros(WIDTH, RANK) for _ in LAYERS
    ]
    for t in params:
        t.requires_grad_(True)
    targets = torch.zeros(len(WORDS) + 1, WIDTH)
    targets[:, fam * half : (fam + 1) * half] = torch.randn(len(WORDS) + 1, half)
    words = [1 + WORDS.index(w) for w in FAMILIES[family]]
    ids = torch.tensor(rng.choice(words, size=(24, 3)))
    for _ in range(steps):
        e = enc.embed(ids)
        x = torch.tanh(enc.layer0(e) + e @ (params[2] @ params[0]).T)
        y = enc.layer1(x) + x @ (params[3] @ params[1]).T
        loss = torch.nn.functional.mse_loss(y, targets[ids])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for t, g in zip(params, grads, strict=True):
                t.sub_(LR * g)
    return {
        n: (params[i].detach().numpy().copy(), params[2 + i].detach().numpy().copy())
        for i, n in enumerate(LAYERS)
    }


def write_lora_patch(
    base: Path, factors: dict[str, tuple[np.ndarray, np.ndarray]], out: Path
) -> Path:
    """The LoRA as a potluck patch pinned to ``base``'s tensor hashes."""
    payloads = {
        f"{n}.weight": factors_payload(b, a, shape=(b.shape[0], a.shape[1]), dtype="F32")
        for n, (a, b) in factors.items()
    }
    with open_path(base) as src:
        pins = {name: tensor_sha256(src.read(name)) for name in payloads}
    write_patch(out, PatchContents(payloads, pins, {}, [], [], {"author": "demo"}))
    return out


def _build(work: Path, rng: np.random.Generator, log: Log) -> tuple[dict[str, Any], Path]:
    """Base file, two experts in a library, a locked Arrow composition."""
    p = base_params(rng)
    base = work / "base.safetensors"
    specs = [(n, from_numpy(v.dtype), tuple(v.shape)) for n, v in p.items()]
    write_safetensors(base, specs, list(p.values()))
    factors = {}
    for fam in FAMILIES:
        factors[fam] = train_expert(p, fam, rng)
        patch = write_lora_patch(base, factors[fam], work / f"{fam}.patch")
        opts = AddOptions(tags=[fam], arrow=True, description=f"LoRA r{RANK}: {fam} only")
        add_expert(work / "experts", patch, fam, "1.0", base=str(base), options=opts)
        log(
            f"$ potluck experts add {fam}.patch --name {fam} --version 1.0 "
            f"--base base.safetensors --tag {fam} --arrow"
        )
    (work / "route.toml").write_text(
        'base = "base.safetensors"\nlibrary = "experts"\n'
        f"experts = {json.dumps([f'{f}@1.0' for f in FAMILIES])}\n\n"
        '[router]\nstrategy = "arrow"\ntop_k = 1\ngranularity = "token"\n'
    )
    write_lock(work / "route.lock", lock_manifest(work / "route.toml"))
    log("$ potluck compose lock route.toml     # router: arrow, top-1, per token")
    return {"params": p, "factors": factors}, work / "route.lock"


def _route(lock: Path, p: dict[str, np.ndarray]) -> dict[str, Any]:
    """Run every input through the composition; per input the routing and the output."""
    import torch

    from potluck.ops.compose.runtime import compose

    composed = compose(lock, model=_encoder_class()(p))
    out: dict[str, Any] = {}
    for text in INPUTS:
        ids = torch.tensor([token_ids(text)])
        with torch.no_grad():
            hidden = composed(input_ids=ids).numpy()[0].astype(np.float64)
        trace = composed.route_trace()
        routes = {
            layer: [trace[layer]["experts"][int(i)] for i in trace[layer]["indices"][:, 0]]
            for layer in LAYERS
        }
        out[text] = {"routes": routes, "output": hidden}
    return out


def routing_story(work: Path, log: Log, seed: int = 0) -> dict[str, Any]:
    """Build, compose and route; returns the numbers and routes it printed (for tests)."""
    t0 = time.perf_counter()
    import torch  # timed apart: loading torch is most of this story's time

    t_import = time.perf_counter() - t0
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    log("\n$ (two contributors) rank-2 LoRA experts of a tiny encoder: colours, animals")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 32-wide matrices: threads only add overhead; restored below
    try:
        built, lock = _build(work, rng, log)
        routed = _route(lock, built["params"])
    finally:
        torch.set_num_threads(threads)
    log("$ potluck compose run route.lock --input …   (per token: expert at layer0 / layer1)")
    for text, r in routed.items():
        cells = [
            f"{w}→{'/'.join(r['routes'][layer][i] for layer in LAYERS)}"
            for i, w in enumerate(text.split())
        ]
        log(f"  {text!r:<22} " + "  ".join(cells))
    agree = sum(
        r["routes"][layer][i] == fam
        for text, r in routed.items()
        for i, w in enumerate(text.split())
        for layer in LAYERS
        for fam in FAMILIES
        if w in FAMILIES[fam]
    )
    total = sum(len(t.split()) for t in INPUTS) * len(LAYERS)
    seconds = time.perf_counter() - t0
    log(
        f"  {agree}/{total} token routings went to the word's own family's expert "
        f"({seconds:.1f}s, of which {t_import:.1f}s importing torch)"
    )
    return {
        "routing_root": str(work),
        "routing": routed,
        "routing_agree": agree,
        "routing_total": total,
        "routing_params": built["params"],
        "routing_factors": built["factors"],
        "routing_seconds": seconds,
        "routing_torch_import_seconds": t_import,
    }
