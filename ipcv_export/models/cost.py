"""ipcv.md's cost model for packed ViT towers, counted as the FLOP counter counts (2 per
multiply-add, matrix products only): what an exact IPCV graph must cost at least."""

from __future__ import annotations

from dataclasses import dataclass

from ..tokens import kept_count


@dataclass(frozen=True)
class TowerShape:
    """The sizes the cost model needs. mlp_macs: multiply-adds of one token's MLP. Towers without
    a merger leave merge and merged_out at 0; special_tokens (CLS) are always kept."""

    depth: int
    width: int  # d
    patch_width: int  # C * T * P * P, the patch embedding's input
    mlp_macs: int
    merge: int = 0
    merged_out: int = 0  # the merger's output width
    special_tokens: int = 0


def ipcv_flops(shape: TowerShape, retention_e4: int, prune_layer: int, as_depth: int, tokens: int) -> int:
    """FLOPs of one segment (image) of `tokens` patches: blocks before l_p on N rows, AS blocks
    with queries and outputs on K rows and keys/values on N, the rest on K, plus the neighbour
    search (R x K distances), patch embedding and merger. Attention is dense within the segment.
    Special tokens add to N and to K."""
    d = shape.width
    merged = d * shape.merge ** 2

    def block(queries: int, keys: int) -> int:  # queries == outputs: rows that get a new state
        return (2 * d * (queries * d + keys * 2 * d) + 4 * queries * keys * d + 2 * queries * d * d
                + 2 * queries * shape.mlp_macs)

    n = tokens + shape.special_tokens
    kept = shape.special_tokens + kept_count(tokens, retention_e4)
    embed = 2 * tokens * shape.patch_width * d
    merger = 2 * (tokens // shape.merge ** 2) * merged * (merged + shape.merged_out) if shape.merge else 0
    if kept == n:
        return embed + shape.depth * block(n, n) + merger
    stabilized = min(as_depth, shape.depth - prune_layer)
    neighbour_search = 2 * (n - kept) * kept * d
    return (embed + prune_layer * block(n, n) + stabilized * block(kept, n)
            + (shape.depth - prune_layer - stabilized) * block(kept, kept) + neighbour_search + merger)
