"""Version control of checkpoints: object database, snapshot/materialise, diff, three-way merge,
object transfer and the wire index. Imports no other wing."""

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
