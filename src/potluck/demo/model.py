"""The demo's model: a tiny numpy GPT, its safetensors writer, and the edits the story makes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from potluck.fileio import atomic_writer

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class TinyConfig:
    """Shape of the demo transformer."""

    vocab: int = 2048
    d: int = 256
    layers: int = 4
    ffn: int = 1024
    ctx: int = 64


def init_params(cfg: TinyConfig, rng: np.random.Generator) -> Params:
    """GPT-style parameters, N(0, 0.02) weights, unit norms."""
    p: Params = {
        "wte": rng.normal(0, 0.02, (cfg.vocab, cfg.d)),
        "wpe": rng.normal(0, 0.01, (cfg.ctx, cfg.d)),
        "ln_f.weight": np.ones(cfg.d),
        "ln_f.bias": np.zeros(cfg.d),
    }
    for i in range(cfg.layers):
        h = f"h.{i}."
        p[h + "ln_1.weight"], p[h + "ln_1.bias"] = np.ones(cfg.d), np.zeros(cfg.d)
        p[h + "attn.qkv.weight"] = rng.normal(0, 0.02, (cfg.d, 3 * cfg.d))
        p[h + "attn.proj.weight"] = rng.normal(0, 0.02, (cfg.d, cfg.d))
        p[h + "ln_2.weight"], p[h + "ln_2.bias"] = np.ones(cfg.d), np.zeros(cfg.d)
        p[h + "mlp.fc.weight"] = rng.normal(0, 0.02, (cfg.d, cfg.ffn))
        p[h + "mlp.proj.weight"] = rng.normal(0, 0.02, (cfg.ffn, cfg.d))
    return {k: v.astype(np.float32) for k, v in p.items()}


def _layer_norm(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    out: np.ndarray = (x - mu) / np.sqrt(var + 1e-5) * w + b
    return out


def forward(p: Params, tokens: np.ndarray, heads: int = 4) -> np.ndarray:
    """Logits of a causal transformer over ``tokens`` (1-D int array)."""
    n = len(tokens)
    x = p["wte"][tokens] + p["wpe"][:n]
    mask = np.triu(np.full((n, n), -1e9, dtype=np.float32), 1)
    layers = len({k.split(".")[1] for k in p if k.startswith("h.")})
    for i in range(layers):
        h = f"h.{i}."
        a = _layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        q, k, v = np.split(a @ p[h + "attn.qkv.weight"], 3, axis=-1)
        dh = q.shape[-1] // heads
        q, k, v = (t.reshape(n, heads, dh).transpose(1, 0, 2) for t in (q, k, v))
        att = q @ k.transpose(0, 2, 1) / np.sqrt(dh) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + (att @ v).transpose(1, 0, 2).reshape(n, -1) @ p[h + "attn.proj.weight"]
        m = _layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        x = x + np.maximum(m @ p[h + "mlp.fc.weight"], 0) @ p[h + "mlp.proj.weight"]
    x = _layer_norm(x, p["ln_f.weight"], p["ln_f.bias"])
    logits: np.ndarray = x @ p["wte"].T
    return logits


def save_safetensors(p: Params, path: Path) -> None:
    """Write ``p`` as safetensors (sorted names, F32) without the safetensors package."""
    from potluck.formats.safetensors import build_header

    names = sorted(p)
    header = build_header([(n, "F32", tuple(p[n].shape)) for n in names], {"format": "np"})
    with atomic_writer(path) as f:
        f.write(header)
        for n in names:
            f.write(np.ascontiguousarray(p[n], dtype="<f4").tobytes())


def dense_step(
    p: Params, rng: np.random.Generator, prefixes: tuple[str, ...] | None = None
) -> Params:
    """One fine-tuning step: every weight (or those under ``prefixes``) moves a tiny bit."""
    return {
        k: (v + 1e-3 * np.abs(v) * rng.standard_normal(v.shape)).astype(np.float32)
        if prefixes is None or k.startswith(prefixes)
        else v
        for k, v in p.items()
    }


def sparse_edit(p: Params, rng: np.random.Generator, layer: int = 2) -> Params:
    """A knowledge edit: 0.5 % of one MLP matrix changes (ROME-like, localised)."""
    q = dict(p)
    w = p[f"h.{layer}.mlp.proj.weight"].copy()
    idx = rng.choice(w.size, size=w.size // 200, replace=False)
    w.reshape(-1)[idx] += rng.normal(0, 0.01, idx.size).astype(np.float32)
    q[f"h.{layer}.mlp.proj.weight"] = w
    return q


def retrain(p: Params, rng: np.random.Generator, prefixes: tuple[str, ...]) -> Params:
    """Some tensors retrained from scratch (new values, same shapes)."""
    return {
        k: (
            rng.normal(0, 0.02, v.shape).astype(np.float32)
            if k.startswith(prefixes) and v.ndim == 2
            else v
        )
        for k, v in p.items()
    }


def lora_update(p: Params, rng: np.random.Generator, rank: int = 4, scale: float = 1e-2) -> Params:
    """A contributor's fine-tune: every attention matrix moves by a rank-``rank`` product B·A
    (LoRA-style, entries of B and A ~ N(0, ``scale``)) and the layer-norm gains by ~1 %."""
    q = dict(p)
    for k, v in p.items():
        if ".attn." in k and v.ndim == 2:
            b = rng.normal(0, scale, (v.shape[0], rank))
            a = rng.normal(0, scale, (rank, v.shape[1]))
            q[k] = (v + b @ a).astype(np.float32)
        elif k.endswith(("ln_1.weight", "ln_2.weight")):
            q[k] = (v * (1 + 0.01 * rng.standard_normal(v.shape))).astype(np.float32)
    return q
