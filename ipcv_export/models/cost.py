"""ipcv.md's cost model for packed ViT towers, counted as the FLOP counter counts (2 per
multiply-add, matrix products only): what an exact IPCV graph must cost at least."""

from __future__ import annotations

from dataclasses import dataclass

from ..tokens import kept_count


@dataclass(frozen=True)
class TowerShape:
    """The sizes the cost model needs. mlp_macs: multiply-adds of one token's MLP."""

    depth: int
    width: int  # d
    patch_width: int  # C * T * P * P, the patch embedding's input
    mlp_macs: int
    merge: int
    merged_out: int  # the merger's output width


def ipcv_flops(shape: TowerShape, retention_e4: int, prune_layer: int, as_depth: int, tokens: int) -> int:
    """FLOPs of one segment of `tokens` patches: blocks before l_p on N rows, AS blocks with
    queries and outputs on K rows and keys/values on N, the rest on K, plus the neighbour search
    (R x K distances), patch embedding and merger. Attention is dense within the segment."""
    d = shape.width
    merged = d * shape.merge ** 2

    def block(queries: int, keys: int) -> int:  # queries == outputs: rows that get a new state
        return (2 * d * (queries * d + keys * 2 * d) + 4 * queries * keys * d + 2 * queries * d * d
                + 2 * queries * shape.mlp_macs)

    n = tokens
    kept = kept_count(n, retention_e4)
    embed = 2 * n * shape.patch_width * d
    merger = 2 * (n // shape.merge ** 2) * merged * (merged + shape.merged_out)
    if kept == n:
        return embed + shape.depth * block(n, n) + merger
    stabilized = min(as_depth, shape.depth - prune_layer)
    neighbour_search = 2 * (n - kept) * kept * d
    return (embed + prune_layer * block(n, n) + stabilized * block(kept, n)
            + (shape.depth - prune_layer - stabilized) * block(kept, kept) + neighbour_search + merger)
