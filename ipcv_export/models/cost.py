"""ipcv.md's cost model for packed ViT towers, counted as the FLOP counter counts (2 per
multiply-add, matrix products only): what an exact IPCV graph must cost at least."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..ops import BAND_TILES, band_rows
from ..tokens import kept_count, merge_rounds


@dataclass(frozen=True)
class TowerShape:
    """The sizes the cost model needs. mlp_macs: multiply-adds of one token's MLP. The head after
    the blocks (merger, projector) costs head_macs per group of head_group patches (Qwen's merger:
    merge^2 patches per row); 0 for none. special_tokens (CLS) are always kept. banded_blocks:
    blocks whose attention is banded (windows of at most band_span tokens, `ops._banded_attention`)."""

    depth: int
    width: int  # d
    patch_width: int  # C * T * P * P, the patch embedding's input
    mlp_macs: int
    head_macs: int = 0
    head_group: int = 1
    special_tokens: int = 0
    banded_blocks: frozenset[int] = frozenset()
    band_span: int = 0

    def attention_pairs(self, index: int, queries: int, keys: int) -> int:
        """Query-key pairs block `index` computes: all of them, or its band over the key rows (a
        banded AS block attends with every row and reads the kept ones)."""
        if index in self.banded_blocks:
            return band_rows(keys, self.band_span) * BAND_TILES * self.band_span
        return queries * keys


def merger_macs(width: int, merge: int, out: int) -> int:
    """Multiply-adds of a Qwen-style merger row: merge^2 tokens concatenated, two linear layers."""
    merged = width * merge ** 2
    return merged * (merged + out)


AttentionPairs = Callable[[int, int, int], int]
"""(block index, query rows, key rows) -> query-key pairs the block's attention computes."""


def ipcv_flops(shape: TowerShape, retention_e4: int, prune_layer: int, as_depth: int, tokens: int,
               selection: str = "score", pairs: AttentionPairs | None = None) -> int:
    """FLOPs of one segment (image) of `tokens` patches: blocks before l_p on N rows, AS blocks
    with queries and outputs on K rows and keys/values on N, the rest on K, plus the neighbour
    search (R x K distances), patch embedding and merger. Attention is dense within the segment,
    or banded in `shape.banded_blocks`; `pairs` prices it otherwise (an ideal floor).
    Special tokens add to N and to K. Bipartite selection adds its N x (K // 2) cosines; merge
    selection replaces the neighbour search by its rounds (`merge_flops`)."""
    pairs = pairs or shape.attention_pairs

    def blocks(indices: range, queries: int, keys: int) -> int:
        return sum(block_flops(shape, queries, keys, pairs(index, queries, keys)) for index in indices)

    n = tokens + shape.special_tokens
    kept = shape.special_tokens + kept_count(tokens, retention_e4)
    ends = _embed_flops(shape, tokens) + _head_flops(shape, tokens)
    if kept == n:
        return ends + blocks(range(shape.depth), n, n)
    stabilized = range(prune_layer, min(prune_layer + as_depth, shape.depth))
    neighbour_search = 0 if selection == "merge" else 2 * (n - kept) * kept * shape.width
    matching = 0
    if selection == "bipartite":
        matching = 2 * n * (kept_count(tokens, retention_e4) // 2) * shape.width
    elif selection == "merge":
        matching = merge_flops(shape.width, tokens, retention_e4)
    return (ends + blocks(range(prune_layer), n, n) + blocks(stabilized, kept, n)
            + blocks(range(stabilized.stop, shape.depth), kept, kept) + neighbour_search + matching)


def stock_flops(shape: TowerShape, tokens: int, pairs_per_block: Sequence[int]) -> int:
    """FLOPs of the stock tower on one call of N = `tokens` patches whose block i attends over
    `pairs_per_block[i]` query-key pairs (the sum over its windows or segments of length^2)."""
    n = tokens + shape.special_tokens
    return (_embed_flops(shape, tokens) + _head_flops(shape, tokens)
            + sum(block_flops(shape, n, n, pairs) for pairs in pairs_per_block))


def block_flops(shape: TowerShape, queries: int, keys: int, pairs: int) -> int:
    """One block's matrix work: qkv (queries for `queries` rows, keys and values for
    `keys`), attention over `pairs`, the output projection and the MLP for `queries` rows."""
    d = shape.width
    return (2 * d * (queries * d + keys * 2 * d) + 4 * pairs * d + 2 * queries * d * d
            + 2 * queries * shape.mlp_macs)


def _embed_flops(shape: TowerShape, tokens: int) -> int:
    return 2 * tokens * shape.patch_width * shape.width


def _head_flops(shape: TowerShape, tokens: int) -> int:
    return 2 * (tokens // shape.head_group) * shape.head_macs


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
