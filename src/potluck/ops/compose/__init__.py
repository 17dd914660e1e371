"""Modular models: expert libraries (versioned low-rank / (IA)³ patches of a pinned base),
composition manifests and lockfiles, and the torch runtime (``runtime``, imported on demand)."""

from potluck.ops.compose.library import (
    AddOptions,
    ExpertRecord,
    add_expert,
    attach_artifact,
    base_mismatches,
    find_expert,
    list_experts,
    mismatch_error,
    verify_library,
)
from potluck.ops.compose.manifest import (
    export_mixture,
    load_composition,
    lock_manifest,
    write_lock,
)

__all__ = [
    "AddOptions",
    "ExpertRecord",
    "add_expert",
    "attach_artifact",
    "base_mismatches",
    "export_mixture",
    "find_expert",
    "list_experts",
    "load_composition",
    "lock_manifest",
    "mismatch_error",
    "verify_library",
    "write_lock",
]
