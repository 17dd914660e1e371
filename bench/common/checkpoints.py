"""A GPT-2-shaped checkpoint and its five-version history (bench.vcs, bench.remote).

v1 is N(0, 0.02) (LayerNorm gains around 1); v2..v5 are a dense update, a 1%-sparse update of 4
matrices, two replaced tensors and a merged rank-8 LoRA. Deterministic for a size and dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

CKPT = "model.safetensors"
MB = 1e6
SEED = 20240601
DTYPES: dict[str, np.dtype] = {
    "f32": np.dtype(np.float32),
    "bf16": np.dtype(ml_dtypes.bfloat16),
}
# (n_layer, d_model, vocab, n_ctx)
SIZES: dict[str, tuple[int, int, int, int]] = {
    "gpt2": (12, 768, 50257, 1024),
    "small": (4, 256, 8192, 512),
}
StateDict = dict[str, np.ndarray]


def gpt2_shapes(n_layer: int, d: int, vocab: int, n_ctx: int) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a GPT-2 (HF transformers layout, Conv1D = (in, out))."""
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, d), "wpe.weight": (n_ctx, d)}
    for i in range(n_layer):
        p = f"h.{i}."
        for ln in ("ln_1", "ln_2"):
            shapes[p + ln + ".weight"] = (d,)
            shapes[p + ln + ".bias"] = (d,)
        for name, (fan_in, fan_out) in {
            "attn.c_attn": (d, 3 * d),
            "attn.c_proj": (d, d),
            "mlp.c_fc": (d, 4 * d),
            "mlp.c_proj": (4 * d, d),
        }.items():
            shapes[p + name + ".weight"] = (fan_in, fan_out)
            shapes[p + name + ".bias"] = (fan_out,)
    shapes["ln_f.weight"] = (d,)
    shapes["ln_f.bias"] = (d,)
    return shapes


def normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def initial_state(
    shapes: dict[str, tuple[int, ...]], dtype: np.dtype, rng: np.random.Generator
) -> StateDict:
    """Trained-looking values: N(0, 0.02) everywhere, LayerNorm gains around 1."""
    sd: StateDict = {}
    for name, shape in shapes.items():
        w = normal(rng, shape, 0.02)
        if ".ln_" in name or name.startswith("ln_f"):
            w += np.float32(1.0) if name.endswith(".weight") else np.float32(0.0)
        sd[name] = w.astype(dtype)
    return sd


def dense_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v2: every tensor gets w += 1e-3 * |w| * N(0, 1), rounded to the checkpoint dtype."""
    for name, w in sd.items():
        w32 = w.astype(np.float32)
        w32 += np.float32(1e-3) * np.abs(w32) * rng.standard_normal(w.shape, dtype=np.float32)
        sd[name] = w32.astype(w.dtype)


def sparse_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v3: 1% of the entries of 4 matrices get fresh N(0, 0.02) values."""
    layers = layer_count(sd)
    picks = [
        "h.0.attn.c_attn.weight",
        f"h.{layers // 3}.mlp.c_fc.weight",
        f"h.{2 * layers // 3}.mlp.c_proj.weight",
        f"h.{layers - 1}.attn.c_proj.weight",
    ]
    for name in picks:
        flat = sd[name].reshape(-1)
        idx = rng.choice(flat.size, size=flat.size // 100, replace=False)
        flat[idx] = normal(rng, (idx.size,), 0.02).astype(flat.dtype)


def replace_update(sd: StateDict, rng: np.random.Generator) -> None:
    """v4: two tensors are replaced by new random ones."""
    for name in ("wpe.weight", f"h.{layer_count(sd) // 2}.mlp.c_fc.weight"):
        sd[name] = normal(rng, sd[name].shape, 0.02).astype(sd[name].dtype)


def lora_update(sd: StateDict, rng: np.random.Generator, rank: int = 8) -> None:
    """v5: merge a rank-8 LoRA (alpha 16) into c_attn and c_proj of every layer."""
    scale = np.float32(16 / rank)
    for i in range(layer_count(sd)):
        for name in (f"h.{i}.attn.c_attn.weight", f"h.{i}.attn.c_proj.weight"):
            w = sd[name]
            b = normal(rng, (w.shape[0], rank), 0.02)
            a = normal(rng, (rank, w.shape[1]), 0.02)
            sd[name] = (w.astype(np.float32) + (b @ a) * scale).astype(w.dtype)


def layer_count(sd: StateDict) -> int:
    return sum(1 for name in sd if name.endswith(".ln_1.weight"))


UPDATES: list[tuple[str, Callable[[StateDict, np.random.Generator], None]]] = [
    ("v2 dense update", dense_update),
    ("v3 sparse 1% x4", sparse_update),
    ("v4 replace 2 tensors", replace_update),
    ("v5 LoRA r8 merge", lora_update),
]


@dataclasses.dataclass
class Version:
    label: str
    path: Path
    nbytes: int
    sha256: str
    changed_frac: float  # fraction of all entries that differ from the previous version


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def changed_fraction(old: StateDict, new: StateDict) -> float:
    total = sum(w.size for w in new.values())
    changed = 0
    for name, w in new.items():
        a, b = old[name].view(np.uint8), w.view(np.uint8)
        itemsize = w.dtype.itemsize
        changed += int(np.any((a != b).reshape(-1, itemsize), axis=1).sum())
    return changed / total


def build_history(size: str, dtype_key: str, out_dir: Path) -> list[Version]:
    """Write v1..v5 of the checkpoint into out_dir (deterministic for size and dtype)."""
    rng = np.random.default_rng(SEED)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = initial_state(gpt2_shapes(*SIZES[size]), DTYPES[dtype_key], rng)
    versions: list[Version] = []
    steps: list[tuple[str, Callable[[StateDict, np.random.Generator], None] | None]] = [
        ("v1 add+commit (new)", None),
        *UPDATES,
    ]
    for n, (label, update) in enumerate(steps, 1):
        prev = {k: v.copy() for k, v in sd.items()}
        if update is not None:
            update(sd, rng)
        path = out_dir / f"v{n}.safetensors"
        save_file(sd, str(path))
        frac = 1.0 if update is None else changed_fraction(prev, sd)
        versions.append(Version(label, path, path.stat().st_size, file_sha256(path), frac))
    return versions


def describe_history(dtype: str, versions: list[Version]) -> None:
    v1 = versions[0]
    print(f"## dtype {dtype}: checkpoint {v1.nbytes / MB:.1f} MB ({CKPT})")
    for v in versions:
        print(f"#   {v.label:<22} {100 * v.changed_frac:6.2f}% of entries changed")
