"""Version control of checkpoints: object database, snapshot/materialise, diff, three-way merge,
object transfer and the wire index. Imports no other wing.

Names are imported from their modules on first use: a filter process needs only ``snapshot``,
and importing ``diff`` or ``pushfetch`` too would cost every ``git add`` a tenth of a second.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from potluck.ops.vcs.diff import Reader, TensorChange, diff_manifests, unchanged_count
    from potluck.ops.vcs.materialize import (
        TensorLoader,
        entry_offsets,
        load_tensors,
        missing_objects,
        tensor_names,
        write_file,
    )
    from potluck.ops.vcs.odb import ObjectDB
    from potluck.ops.vcs.pushfetch import (
        OnBytes,
        PushReport,
        Wanted,
        fetch_objects,
        push_objects,
        store_fresh,
    )
    from potluck.ops.vcs.snapshot import (
        Chain,
        read_range,
        scan_manifest,
        scan_structure,
        snapshot_stream,
    )
    from potluck.ops.vcs.threeway import (
        Combine,
        Combiner,
        MergeResult,
        merge_manifests,
        resolve_manifest,
    )
    from potluck.ops.vcs.wire import WireEntry, dump_index, parse_index

_WHERE = {
    "Chain": "potluck.ops.vcs.snapshot",
    "Combine": "potluck.ops.vcs.threeway",
    "Combiner": "potluck.ops.vcs.threeway",
    "MergeResult": "potluck.ops.vcs.threeway",
    "ObjectDB": "potluck.ops.vcs.odb",
    "OnBytes": "potluck.ops.vcs.pushfetch",
    "PushReport": "potluck.ops.vcs.pushfetch",
    "Reader": "potluck.ops.vcs.diff",
    "TensorChange": "potluck.ops.vcs.diff",
    "TensorLoader": "potluck.ops.vcs.materialize",
    "Wanted": "potluck.ops.vcs.pushfetch",
    "WireEntry": "potluck.ops.vcs.wire",
    "diff_manifests": "potluck.ops.vcs.diff",
    "dump_index": "potluck.ops.vcs.wire",
    "entry_offsets": "potluck.ops.vcs.materialize",
    "fetch_objects": "potluck.ops.vcs.pushfetch",
    "load_tensors": "potluck.ops.vcs.materialize",
    "merge_manifests": "potluck.ops.vcs.threeway",
    "missing_objects": "potluck.ops.vcs.materialize",
    "parse_index": "potluck.ops.vcs.wire",
    "push_objects": "potluck.ops.vcs.pushfetch",
    "read_range": "potluck.ops.vcs.snapshot",
    "resolve_manifest": "potluck.ops.vcs.threeway",
    "scan_manifest": "potluck.ops.vcs.snapshot",
    "scan_structure": "potluck.ops.vcs.snapshot",
    "snapshot_stream": "potluck.ops.vcs.snapshot",
    "store_fresh": "potluck.ops.vcs.pushfetch",
    "tensor_names": "potluck.ops.vcs.materialize",
    "unchanged_count": "potluck.ops.vcs.diff",
    "write_file": "potluck.ops.vcs.materialize",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(where), name)


__all__ = [
    "Chain",
    "Combine",
    "Combiner",
    "MergeResult",
    "ObjectDB",
    "OnBytes",
    "PushReport",
    "Reader",
    "TensorChange",
    "TensorLoader",
    "Wanted",
    "WireEntry",
    "diff_manifests",
    "dump_index",
    "entry_offsets",
    "fetch_objects",
    "load_tensors",
    "merge_manifests",
    "missing_objects",
    "parse_index",
    "push_objects",
    "read_range",
    "resolve_manifest",
    "scan_manifest",
    "scan_structure",
    "snapshot_stream",
    "store_fresh",
    "tensor_names",
    "unchanged_count",
    "write_file",
]
