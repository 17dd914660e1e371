"""Lineage: where each model came from, pinned by content (issue 17, docs/lineage.md).

``weights_digest_of`` identifies a model's weights whatever their format or sharding; an
``Edge`` links a child digest to its parents (commit and digest) with a relation, method and
parameters; output directories carry them in ``lineage.json`` (``record_output``). Walking them
across git commits is ``potluck.git.lineage``.
"""

from potluck.ops.lineage.digest import (
    array_sha256,
    manifest_hashes,
    manifests_digest,
    tensor_hashes,
    weights_digest_of,
)
from potluck.ops.lineage.edge import (
    LINEAGE_FILE,
    LINEAGE_VERSION,
    RELATIONS,
    Edge,
    Lineage,
    Parent,
    lineage_path,
    parse_lineage,
    read_lineage,
    write_lineage,
)
from potluck.ops.lineage.record import (
    card_lines,
    inherited_edges,
    pin,
    plan_edge,
    record_output,
    with_card_lineage,
)

__all__ = [
    "LINEAGE_FILE",
    "LINEAGE_VERSION",
    "RELATIONS",
    "Edge",
    "Lineage",
    "Parent",
    "array_sha256",
    "card_lines",
    "inherited_edges",
    "lineage_path",
    "manifest_hashes",
    "manifests_digest",
    "parse_lineage",
    "pin",
    "plan_edge",
    "read_lineage",
    "record_output",
    "tensor_hashes",
    "weights_digest_of",
    "with_card_lineage",
    "write_lineage",
]
