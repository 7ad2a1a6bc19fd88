"""ipcv.md's cost model for packed ViT towers, counted as the FLOP counter counts (2 per
multiply-add, matrix products only): what an exact IPCV graph must cost at least."""

from __future__ import annotations

from dataclasses import dataclass

from ..tokens import kept_count, merge_rounds


@dataclass(frozen=True)
class TowerShape:
    """The sizes the cost model needs. mlp_macs: multiply-adds of one token's MLP. The head after
    the blocks (merger, projector) costs head_macs per group of head_group patches (Qwen's merger:
    merge^2 patches per row); 0 for none. special_tokens (CLS) are always kept."""

    depth: int
    width: int  # d
    patch_width: int  # C * T * P * P, the patch embedding's input
    mlp_macs: int
    head_macs: int = 0
    head_group: int = 1
    special_tokens: int = 0


def merger_macs(width: int, merge: int, out: int) -> int:
    """Multiply-adds of a Qwen-style merger row: merge^2 tokens concatenated, two linear layers."""
    merged = width * merge ** 2
    return merged * (merged + out)


def ipcv_flops(shape: TowerShape, retention_e4: int, prune_layer: int, as_depth: int, tokens: int,
               selection: str = "score") -> int:
    """FLOPs of one segment (image) of `tokens` patches: blocks before l_p on N rows, AS blocks
    with queries and outputs on K rows and keys/values on N, the rest on K, plus the neighbour
    search (R x K distances), patch embedding and merger. Attention is dense within the segment.
    Special tokens add to N and to K. Bipartite selection adds its N x (K // 2) cosines; merge
    selection replaces the neighbour search by its rounds (`merge_flops`)."""
    d = shape.width

    def block(queries: int, keys: int) -> int:  # queries == outputs: rows that get a new state
        return (2 * d * (queries * d + keys * 2 * d) + 4 * queries * keys * d + 2 * queries * d * d
                + 2 * queries * shape.mlp_macs)

    n = tokens + shape.special_tokens
    kept = shape.special_tokens + kept_count(tokens, retention_e4)
    embed = 2 * tokens * shape.patch_width * d
    merger = 2 * (tokens // shape.head_group) * shape.head_macs
    if kept == n:
        return embed + shape.depth * block(n, n) + merger
    stabilized = min(as_depth, shape.depth - prune_layer)
    neighbour_search = 0 if selection == "merge" else 2 * (n - kept) * kept * d
    matching = 0
    if selection == "bipartite":
        matching = 2 * n * (kept_count(tokens, retention_e4) // 2) * d
    elif selection == "merge":
        matching = merge_flops(d, tokens, retention_e4)
    return (embed + prune_layer * block(n, n) + stabilized * block(kept, n)
            + (shape.depth - prune_layer - stabilized) * block(kept, kept) + neighbour_search + matching + merger)


def merge_flops(width: int, patches: int, retention_e4: int) -> int:
    """Matrix work of merge selection (tokens.merge_tokens) on one image's P patches: per round of
    n tokens, the ceil(n/2) x floor(n/2) cosines and the P x (tokens after it) one-hot product of
    the group means. Full rounds leave floor(n/2), the last K."""
    rounds, total, n = merge_rounds(retention_e4), 0, patches
    for index in range(rounds):
        after = n // 2 if index < rounds - 1 else kept_count(patches, retention_e4)
        total += 2 * ((n + 1) // 2) * (n // 2) * width + 2 * patches * after * width
        n = after
    return total
