"""What `inspect` reports about a layout, as one JSON-ready dict."""

from collections import Counter

from .model.layout import Layout


def describe(layout: Layout, max_memory: int | None = None) -> dict:
    """Architecture, geometry and the byte budget of a checkpoint; with max_memory, how a cache would fit."""
    slice_sizes = Counter(s.nbytes for s in layout.slices.values())
    by_type: dict[str, int] = {}
    for s in layout.slices.values():
        types = "+".join(sorted({p.dtype for p in s.parts}))
        by_type[types] = max(by_type.get(types, 0), s.nbytes)
    out = {
        "architecture": layout.architecture,
        "format": layout.format,
        "path": layout.path,
        "files": len(layout.files),
        "num_layers": layout.num_layers,
        "num_moe_layers": len(layout.moe_layers),
        "dense_layers": [i for i in range(layout.num_layers) if i not in set(layout.moe_layers)],
        "num_experts": layout.num_experts,
        "experts_per_token": layout.experts_per_token,
        "num_slices": len(layout.slices),
        "slice_bytes": layout.slice_bytes,
        "slice_bytes_by_type": by_type,
        "distinct_slice_sizes": len(slice_sizes),
        "expert_bytes": layout.expert_bytes,
        "resident_bytes": layout.resident_bytes,
        "resident_breakdown": layout.resident_by_category(),
        "total_bytes": layout.expert_bytes + layout.resident_bytes,
        "bytes_per_token": layout.resident_bytes + sum(
            layout.experts_per_token * max(layout.slices[(l, e)].nbytes for e in range(layout.num_experts))
            for l in layout.moe_layers),
    }
    if max_memory is not None:
        from .runtime.load import memory_plan

        out["plan"] = memory_plan(layout, max_memory).to_dict()
    return out
