"""Model cards (``README.md`` with YAML front matter) for checkpoints written by ``patch apply``.

The front matter follows the Hugging Face model card fields: ``base_model`` (the base
reference), ``base_model_relation`` (``adapter`` when every non-``full`` payload is ``lowrank``
or ``ia3``, ``finetune`` otherwise) and ``tags: [potluck]``. The body names the patch: its sha256,
its description fields, the codecs used and whether the result is exact.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from potluck.codecs import CODECS
from potluck.errors import UserError
from potluck.fileio import atomic_writer
from potluck.ops.patch.fileformat import PatchContents

__all__ = ["ADAPTER_CODECS", "card_text", "check_card_path", "relation", "write_card"]

#: Codecs whose payloads are adapters (a low-rank product or a per-channel scale).
ADAPTER_CODECS = frozenset({"lowrank", "ia3"})

#: Marks a card written by potluck (so a later apply may overwrite it).
_MARK = "<!-- written by potluck patch apply -->"


def relation(patch: PatchContents) -> str:
    """``adapter`` when all non-``full`` payloads are low-rank or IA³, else ``finetune``."""
    codecs = {p.codec for p in patch.payloads.values() if p.codec != "full"}
    return "adapter" if codecs and codecs <= ADAPTER_CODECS else "finetune"


def _yaml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid YAML scalar


def card_text(base_ref: str, patch_sha256: str, patch: PatchContents, *, scale: float) -> str:
    """The model card of a checkpoint made by applying ``patch`` to ``base_ref``."""
    exact = all(CODECS.get(p.codec).exact for p in patch.payloads.values()) and scale == 1.0
    counts = Counter(p.codec for p in patch.payloads.values())
    lines = [
        "---",
        f"base_model: {_yaml_str(base_ref)}",
        f"base_model_relation: {relation(patch)}",
        "tags:",
        "- potluck",
        "---",
        _MARK,
        "",
        "# Patched model",
        "",
        f"This checkpoint is `{base_ref}` with a potluck patch applied.",
        "",
        f"- patch sha256: `{patch_sha256}`",
        f"- base digest: `{patch.base_digest}`",
    ]
    for key, value in sorted(patch.description.items()):
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        lines.append(f"- {key}: {shown}")
    used = ", ".join(f"{c} ({n} tensor{'s' if n != 1 else ''})" for c, n in sorted(counts.items()))
    lines.append(f"- codecs: {used or 'none'}")
    lines.append(
        f"- changed: {len(patch.base)}, added: {len(patch.payloads) - len(patch.base)}, "
        f"removed: {len(patch.removed)}"
    )
    if scale != 1.0:
        lines.append(f"- scale: {scale:g}")
    lines.append(
        "- exact: yes (every tensor is bit-identical to the patch author's target)"
        if exact
        else "- exact: no (lossy codecs or scaling; the result approximates the target)"
    )
    return "\n".join(lines) + "\n"


def check_card_path(path: str | os.PathLike[str]) -> None:
    """Refuse to overwrite a ``README.md`` that potluck did not write."""
    p = Path(path)
    if p.exists() and _MARK not in p.read_text(encoding="utf-8", errors="replace"):
        raise UserError(
            f"{p} exists and was not written by potluck; not overwriting it",
            hint="move it away, or write the output somewhere else",
            path=str(p),
        )


def write_card(path: str | os.PathLike[str], text: str) -> None:
    """Write the card atomically."""
    with atomic_writer(path) as f:
        f.write(text.encode("utf-8"))
