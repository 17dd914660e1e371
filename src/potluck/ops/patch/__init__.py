"""Patches: a fine-tune shipped as a small, verifiable update of a pinned base — file format,
create, apply, stack, ``--check`` quality, ``--eval`` output change (``evaluate``, torch on
demand), model card, output layout."""

from potluck.ops.patch.apply import ApplyReport, apply_patch, is_directory
from potluck.ops.patch.check import OutputChange, QualityReport
from potluck.ops.patch.create import PatchEntry, PatchInfo, create_patch, patch_info
from potluck.ops.patch.fileformat import PatchContents, read_patch, write_patch
from potluck.ops.patch.stack import stack_patches

__all__ = [
    "ApplyReport",
    "OutputChange",
    "PatchContents",
    "PatchEntry",
    "PatchInfo",
    "QualityReport",
    "apply_patch",
    "create_patch",
    "is_directory",
    "patch_info",
    "read_patch",
    "stack_patches",
    "write_patch",
]
