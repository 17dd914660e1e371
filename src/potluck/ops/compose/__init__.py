"""Modular models: expert libraries (versioned low-rank / (IA)³ patches of a pinned base),
composition manifests and lockfiles, and the torch runtime (``runtime``, imported on demand)."""

from potluck.ops.compose.library import AddOptions, add_expert, list_experts, verify_library
from potluck.ops.compose.manifest import (
    export_mixture,
    load_composition,
    lock_manifest,
    write_lock,
)

__all__ = [
    "AddOptions",
    "add_expert",
    "export_mixture",
    "list_experts",
    "load_composition",
    "lock_manifest",
    "verify_library",
    "write_lock",
]
