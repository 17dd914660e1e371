"""PEFT interop without peft: adapter reading and config, merge arithmetic (peft's operation
order), apply (``merge_and_unload``), import as a patch, export a patch as an adapter."""

from potluck.ops.peft.adapter import merged, plan_adapter
from potluck.ops.peft.apply import PeftApplyReport, apply_adapter
from potluck.ops.peft.export import export_patch
from potluck.ops.peft.importer import PeftImportReport, import_adapter

__all__ = [
    "PeftApplyReport",
    "PeftImportReport",
    "apply_adapter",
    "export_patch",
    "import_adapter",
    "merged",
    "plan_adapter",
]
