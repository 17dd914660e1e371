"""Use cases over manifests and an object store: snapshot, materialise, diff, merge, gc."""
