"""ipcv.md's cost model for packed ViT towers, counted as the FLOP counter counts (2 per
multiply-add, matrix products only): what an exact IPCV graph must cost at least."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..inputs import slice_lengths
from ..ops import BAND_TILES, band_rows
from ..tokens import fine_cells, kept_count, merge_rounds


@dataclass(frozen=True)
class TowerShape:
    """The sizes the cost model needs. mlp_macs: multiply-adds of one token's MLP. The head after
    the blocks (merger, projector) costs head_macs per group of head_group patches (Qwen's merger:
    merge^2 patches per row); 0 for none. special_tokens (CLS) are always kept. banded_blocks:
    blocks whose attention is banded (windows of at most band_span tokens, `ops._banded_attention`).
    pooled: a pooler that averages groups of this many patches by a [P / pooled, P] weight product
    before the head (Gemma 4's, by position): 2 (P / pooled) P d more; 0 for none."""

    depth: int
    width: int  # d
    patch_width: int  # C * T * P * P, the patch embedding's input
    mlp_macs: int
    head_macs: int = 0
    head_group: int = 1
    heads: int = 1  # the head runs once per output: a final merger and one per DeepStack tap, all alike
    special_tokens: int = 0
    banded_blocks: frozenset[int] = frozenset()
    band_span: int = 0
    pooled: int = 0

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
    return ipcv_call_flops(shape, retention_e4, prune_layer, as_depth, [(tokens, kept_count(tokens, retention_e4))],
                           selection, pairs)


def ipcv_call_flops(shape: TowerShape, retention_e4: int, prune_layer: int, as_depth: int,
                    segments: Sequence[tuple[int, int]], selection: str = "score",
                    pairs: AttentionPairs | None = None) -> int:
    """FLOPs of one call of several segments (images, video slices), each given as (patches, kept
    patches): `ipcv_flops` per segment, except that attention never crosses a segment (the sum of
    L_q x L_k over segments, what the stock kernels and the ONNX Runtime form compute; banded
    blocks' band runs over the call's rows) and the neighbour search runs over the call (each
    removed token against every kept one, masked by segment). With the authors' call-wide
    selection the kept counts per segment are the selection's (values): read them from the file."""
    pairs = pairs or shape.attention_pairs
    special = shape.special_tokens
    full = [(patches + special, patches + special) for patches, _ in segments]
    kept = [(chosen + special, patches + special) for patches, chosen in segments]

    def blocks(indices: range, sizes: list[tuple[int, int]]) -> int:
        """Blocks whose segments have (queries, keys) rows each."""
        queries, keys = sum(q for q, _ in sizes), sum(k for _, k in sizes)
        return sum(block_flops(shape, queries, keys,
                               pairs(index, queries, keys) if index in shape.banded_blocks
                               else sum(pairs(index, q, k) for q, k in sizes))
                   for index in indices)

    tokens = sum(patches for patches, _ in segments)
    ends = _embed_flops(shape, tokens) + _head_flops(shape, tokens)
    if all(chosen == patches for patches, chosen in segments):
        return ends + blocks(range(shape.depth), full)
    stabilized = range(prune_layer, min(prune_layer + as_depth, shape.depth))
    n, k = sum(rows for rows, _ in full), sum(rows for rows, _ in kept)
    neighbour_search = 0 if selection == "merge" else 2 * (n - k) * k * shape.width
    matching = 0
    for patches, _ in segments:
        if selection == "bipartite":
            matching += 2 * (patches + special) * (kept_count(patches, retention_e4) // 2) * shape.width
        elif selection == "merge":
            matching += merge_flops(shape.width, patches, retention_e4)
    return (ends + blocks(range(prune_layer), full) + blocks(stabilized, kept)
            + blocks(range(stabilized.stop, shape.depth), [(q, q) for q, _ in kept]) + neighbour_search + matching)


def mixed_flops(shape: TowerShape, retention_e4: int, rows: int, columns: int, cell: int = 2) -> int:
    """FLOPs of mixed-resolution tokens (mixed_resolution.py) with c x c cells on one image of
    rows x columns patches: the patch embedding of the image and of its cell part shrunk by
    (c - 1) / c ((c - 1)^2 patches per cell), every block on S + c^2 F + (c - 1)^2 (C - F) + X
    tokens, and the head on the full grid. The shrinking, the cell choice, the selection and the
    upsampling are no matrix products."""
    cells, small = (rows // cell) * (columns // cell), (cell - 1) ** 2
    fine = max(0, fine_cells(cells, retention_e4, cell))
    tokens = shape.special_tokens + cell * cell * fine + small * (cells - fine) + rows * columns - cell * cell * cells
    patches = rows * columns
    return (_embed_flops(shape, patches) + _embed_flops(shape, small * cells) + _head_flops(shape, patches)
            + shape.depth * block_flops(shape, tokens, tokens, tokens * tokens))


def stock_flops(shape: TowerShape, tokens: int, pairs_per_block: Sequence[int]) -> int:
    """FLOPs of the stock tower on one call of N = `tokens` patches whose block i attends over
    `pairs_per_block[i]` query-key pairs (the sum over its windows or segments of length^2)."""
    n = tokens + shape.special_tokens
    return (_embed_flops(shape, tokens) + _head_flops(shape, tokens)
            + sum(block_flops(shape, n, n, pairs) for pairs in pairs_per_block))


def slice_attention_stock_flops(shape: TowerShape, grid_thw: torch.Tensor) -> int:
    """FLOPs of a stock packed tower whose every block attends within each image or temporal slice
    (its varlen kernels), on one call."""
    lengths = slice_lengths(grid_thw)
    return stock_flops(shape, sum(lengths), [sum(n ** 2 for n in lengths)] * shape.depth)


def block_flops(shape: TowerShape, queries: int, keys: int, pairs: int) -> int:
    """One block's matrix work: qkv (queries for `queries` rows, keys and values for
    `keys`), attention over `pairs`, the output projection and the MLP for `queries` rows."""
    d = shape.width
    return (2 * d * (queries * d + keys * 2 * d) + 4 * pairs * d + 2 * queries * d * d
            + 2 * queries * shape.mlp_macs)


def _embed_flops(shape: TowerShape, tokens: int) -> int:
    return 2 * tokens * shape.patch_width * shape.width


def _head_flops(shape: TowerShape, tokens: int) -> int:
    pooling = 2 * (tokens // shape.pooled) * tokens * shape.width if shape.pooled else 0
    return pooling + 2 * (tokens // shape.head_group) * shape.head_macs * shape.heads


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
