"""Qwen2.5-VL's vision tower: Qwen2-VL's packed layout with RMSNorm, a gated MLP and windows.

Most blocks attend within windows of window_size pixels (8 x 8 patches, at most 64 tokens), the
blocks listed in `fullatt_block_indexes` within each image. Like the stock forward, the exportable
module runs its blocks in window-major order (window by window, each window's merge blocks row by
row), so that each window is one contiguous run and window attention can be banded (cost linear
in N, `ops._banded_attention`); the merger's output is put back in the processor's order. The
stock module gets that order from `get_vision_window_index` (Python loops over grid_thw); here
`window_order` computes it from position and segment ids in integer arithmetic, with no sort of
N-sized data. Kept indices and neighbours refer to the window-major order, and IPCV breaks ties
between equal scores in it, as the stock token order would.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from ..inputs import slice_lengths
from ..ops import QUERY_CHUNKS
from ..tokens import run_bounds
from . import attention, cost
from .cost import TowerShape, merger_macs
from .description import BlockAttention, ModelDescription, sdpa_builder
from .qwen2_vl import image_processor, run_block, run_stabilized_block

def window_side(config: Qwen2_5_VLVisionConfig) -> int:
    """Patches per side of a window (8 in the released models)."""
    return config.window_size // config.patch_size


def window_tokens(config: Qwen2_5_VLVisionConfig) -> int:
    """The most tokens one window holds (64 in the released models): the band's span."""
    return window_side(config) ** 2


def full_block_query_chunks(config: Qwen2_5_VLVisionConfig) -> int:
    """Query slices of the full-attention blocks (the only dense ones; windows are banded): 2 per
    head, so one slice's scores are [heads, N / (2 heads), N] fp32, 2 N^2 bytes (0.5 GB at N =
    16384) whatever the width. With the default 4 slices the 7B shape's were 4.3 GB there and the
    rho = 1 file was killed above 23 GB in ONNX Runtime CPU (benchmarks/memory.py). 32 slices in
    four blocks are as many slice nodes as Qwen2-VL's 32 blocks of 4 (export time); tiny towers
    keep 4."""
    return max(QUERY_CHUNKS, 2 * config.num_heads)


def block_segments(config: Qwen2_5_VLVisionConfig, positions: torch.Tensor, segments: torch.Tensor) -> list[BlockAttention]:
    """Per block: window ids (window blocks; banded) or the image segment ids (full-attention blocks).

    Windows tile each image slice from its top-left corner in squares of window_size // patch_size
    patches, as the stock `get_vision_window_index` tiles the merged grid (partial windows at the
    bottom and right edges). In window-major order (`window_order`) each is a contiguous run.
    """
    full = BlockAttention(segments, query_chunks=full_block_query_chunks(config))
    windows = BlockAttention(window_ids(config, positions, segments), window_tokens(config))
    return [full if index in config.fullatt_block_indexes else windows for index in range(config.depth)]


def window_ids(config: Qwen2_5_VLVisionConfig, positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[N] id of each token's window: its slice's first token plus the window's row-major number
    in the slice. A slice has no more windows than tokens, so ids are distinct across slices and
    below N: they fit in int32 wherever N does (OpenVINO's CPU plugin and TensorRT before 10
    compute int64 in int32; ids built from powers of two wrapped there and merged windows of
    different images). The tokens may come in any order in which each slice is one run whose last
    token is its bottom-right patch (processor order, window-major order)."""
    side = window_side(config)
    first, last = run_bounds(segments)
    # positions are non-negative, so truncation is floor division; it lowers to one integer Div
    # (floor division of signed integers adds a sign test on booleans, which TensorRT rejects)
    window = torch.div(positions, side, rounding_mode="trunc")
    across = torch.div(positions[:, 1].index_select(0, last) + side, side, rounding_mode="trunc")  # windows per row
    return first + window[:, 0] * across + window[:, 1]


def window_order(config: Qwen2_5_VLVisionConfig, positions: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
    """[N] place of each token (processor order: slice by slice, merge blocks row by row) in the
    stock window-major order: within each slice, windows row by row, and within a window its merge
    blocks row by row, each block's merge^2 tokens together. Element-wise integer arithmetic on
    the merged grid, whose size per slice is read from the slice's last token (its bottom-right
    patch); windows at the bottom and right edges are partial, as in `get_vision_window_index`."""
    merge = config.spatial_merge_size
    side = config.window_size // merge // config.patch_size  # window side in merge blocks, as the stock code
    first, last = run_bounds(segments)
    block = torch.div(positions, merge, rounding_mode="trunc")  # non-negative: trunc is floor
    grid = block.index_select(0, last) + 1  # merged rows, columns of each token's slice
    window = torch.div(block, side, rounding_mode="trunc")
    corner = window * side
    extent = torch.minimum(grid - corner, torch.full_like(grid, side))  # the window's rows, columns
    inside = block - corner
    place = (corner[:, 0] * grid[:, 1] + corner[:, 1] * extent[:, 0]  # blocks of the windows before
             + inside[:, 0] * extent[:, 1] + inside[:, 1])
    offset = positions - block * merge
    return first + place * merge * merge + offset[:, 0] * merge + offset[:, 1]


def _inverse(order: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `order` (a permutation of 0..N-1), by one scatter."""
    return torch.zeros_like(order).scatter(0, order, torch.arange(order.shape[0], device=order.device))


class ExportableQwen25VLVision(torch.nn.Module):
    """(pixel_values, image_grid_thw) -> merged embeddings, from the stock submodules."""

    def __init__(self, visual: Qwen2_5_VisionTransformerPretrainedModel) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        position_ids, segment_ids = torch.ops.ipcv.grid_layout(image_grid_thw, pixel_values,
                                                               visual.config.spatial_merge_size)
        place = window_order(visual.config, position_ids, segment_ids)
        window_major = _inverse(place)
        position_ids, segment_ids = position_ids.index_select(0, window_major), segment_ids.index_select(0, window_major)
        hidden = visual.patch_embed(pixel_values.index_select(0, window_major))
        rotary = visual.rotary_pos_emb(hidden, position_ids)
        for block, attention in zip(visual.blocks, block_segments(visual.config, position_ids, segment_ids)):
            # cu_seqlens / max_seqlen are required by the stock signature but unused by the registered
            # attention, which reads segment_ids (see qwen2_vl.ExportableQwen2VLVision).
            hidden = block(hidden, cu_seqlens=attention.segments, max_seqlen=0, position_embeddings=rotary,
                           segment_ids=attention.segments, segment_span=attention.span,
                           query_chunks=attention.query_chunks, segment_rows=image_grid_thw)
        return visual.merger(hidden).index_select(0, merged_places(visual.config, place))


def merged_places(config: Qwen2_5_VLVisionConfig, place: torch.Tensor) -> torch.Tensor:
    """[N / merge^2] window-major row of each processor-order merged token: a merge block moves as one."""
    group = config.spatial_merge_size ** 2
    return torch.div(place[::group], group, rounding_mode="trunc")


def tower_shape(config: Qwen2_5_VLVisionConfig) -> TowerShape:
    """The cost model's sizes; MLP: gated, three d x intermediate products. Window blocks attend in
    a band of 3 x 64 keys per query (`ops._banded_attention`), full blocks densely within the image."""
    return TowerShape(config.depth, config.hidden_size,
                      config.in_channels * config.temporal_patch_size * config.patch_size ** 2,
                      3 * config.hidden_size * config.intermediate_size,
                      merger_macs(config.hidden_size, config.spatial_merge_size, config.out_hidden_size),
                      config.spatial_merge_size ** 2,
                      banded_blocks=frozenset(range(config.depth)) - frozenset(config.fullatt_block_indexes),
                      band_span=window_tokens(config))


def window_lengths(config: Qwen2_5_VLVisionConfig, grid_thw: torch.Tensor) -> list[int]:
    """Tokens of every window of every slice, as the stock module's cu_window_seqlens has them."""
    side = window_side(config)
    return [min(side, h - top) * min(side, w - left)
            for t, h, w in grid_thw.tolist() for _ in range(t)
            for top in range(0, h, side) for left in range(0, w, side)]


def stock_flops(config: Qwen2_5_VLVisionConfig, grid_thw: torch.Tensor) -> int:
    """FLOPs of the stock module on one call: its varlen kernels attend within each window in
    window blocks and within each slice in full blocks (`tests/test_flops.py` checks this against
    torch.utils.flop_counter on the stock module)."""
    windows = sum(length ** 2 for length in window_lengths(config, grid_thw))
    slices = sum(length ** 2 for length in slice_lengths(grid_thw))
    pairs = [slices if index in config.fullatt_block_indexes else windows for index in range(config.depth)]
    return cost.stock_flops(tower_shape(config), sum(slice_lengths(grid_thw)), pairs)


QWEN2_5_VL = ModelDescription(
    architecture="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    weight_prefixes=("visual.", "model.visual."),
    block_path=r"blocks\.(\d+)$",
    build=sdpa_builder(Qwen2_5_VLVisionConfig, Qwen2_5_VisionTransformerPretrainedModel),
    exportable=ExportableQwen25VLVision,
    attention_context=attention.packed,
    image_processor=image_processor,
    query_projection=(r"attn\.qkv$", 0, 3),
    tower_shape=tower_shape,
    stock_flops=stock_flops,
    block_segments=block_segments,
    token_order=window_order,
    run_block=run_block,
    run_stabilized_block=run_stabilized_block,
)
