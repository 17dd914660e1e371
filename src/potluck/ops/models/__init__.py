"""Models as inputs and outputs: sources (checkpoint files, Hugging Face directories,
``file@rev``), the HF directory writer, torch/transformers data helpers (``torchdata``, imported
on demand: it needs the ``stats`` extra at call time)."""

from potluck.ops.models.hfwriter import DEFAULT_SHARD_BYTES, HFDirWriter, parse_size
from potluck.ops.models.sources import (
    CONFIG_FILES,
    ModelInput,
    ModelSource,
    TensorInfo,
    open_input,
    open_path,
)

__all__ = [
    "CONFIG_FILES",
    "DEFAULT_SHARD_BYTES",
    "HFDirWriter",
    "ModelInput",
    "ModelSource",
    "TensorInfo",
    "open_input",
    "open_path",
    "parse_size",
]
