"""Qwen3-VL's and Qwen3.5's vision towers: one description for both (Qwen3.5's is Qwen3-VL's
without DeepStack taps).

Capture path: the stock `transformers` modules, unmodified, as for Qwen2-VL (see qwen2_vl.py):
their forward takes precomputed `position_ids`, `cu_seqlens`, `max_seqlen` and the position
table's interpolation taps (`interp_indices`, `interp_weights`; transformers' `vision_utils` pops
them from the keyword arguments), and the attention function registered under the configured
name reads the segment ids passed down with them.

Why the interpolation is computed here: the towers add a learned [side x side] position table,
resampled bilinearly (align_corners) to each image's grid. transformers computes the taps with
`repeat_interleave` over the grid's values, whose output size is a value, not a shape; the graph
here gives every patch its (row, column) from `ipcv::grid_layout` and its image's (h, w) by
comparisons over [N, images] (`inputs.patch_grid_sides`), so every size follows from the input
shapes and the file takes only what the processor gives. The positions are added at the
embedding, before block 0: pruning never touches them (ipcv.md).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.models.qwen3_5.configuration_qwen3_5 import Qwen3_5VisionConfig
from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5VisionModel
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from ..inputs import patch_grid_sides
from . import attention, cost
from .cost import TowerShape, merger_macs
from .description import ModelDescription, sdpa_builder
from .qwen2_vl import run_block, run_stabilized_block

Qwen3Vision = Qwen3VLVisionModel | Qwen3_5VisionModel


def table_taps(rows_cols: torch.Tensor, sides: torch.Tensor, table_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [N, 4] into the flattened table, weights [N, 4]) that resample a square learned
    position table of `table_side`^2 entries bilinearly, corners aligned, to each patch's place:
    `rows_cols` [N, 2] its (row, column), `sides` [N, 2] its image's (h, w). The arithmetic of
    transformers' `get_vision_interpolation_indices_and_weights` (bilinear, align_corners), on
    shapes that follow from N alone; clamps in fp32, which TensorRT's Clip takes."""
    source = rows_cols.to(torch.float32) * (table_side - 1) / torch.clamp(sides.to(torch.float32) - 1, min=1)
    floor = torch.floor(source)
    offsets = torch.arange(2, device=rows_cols.device, dtype=torch.float32)
    taps = (floor[..., None] + offsets).clamp(0, table_side - 1).long()  # [N, 2 axes, 2]
    weights = (1 - (source[..., None] - floor[..., None] - offsets).abs()).clamp(min=0)
    indices = taps[:, 0, :, None] * table_side + taps[:, 1, None, :]
    return indices.reshape(-1, 4), (weights[:, 0, :, None] * weights[:, 1, None, :]).reshape(-1, 4)


class ExportableQwen3Vision(torch.nn.Module):
    """(pixel_values, image_grid_thw) -> merged embeddings, then each DeepStack tap's, through the
    stock module."""

    def __init__(self, visual: Qwen3Vision) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        visual = self.visual
        position_ids, segment_ids = torch.ops.ipcv.grid_layout(image_grid_thw, pixel_values, visual.spatial_merge_size)
        indices, weights = table_taps(position_ids, patch_grid_sides(image_grid_thw, pixel_values),
                                      visual.num_grid_per_side)
        # cu_seqlens and max_seqlen are read only by flash kernels; the registered attention reads segment_ids.
        out = visual(pixel_values, grid_thw=None, position_ids=position_ids, cu_seqlens=segment_ids, max_seqlen=0,
                     segment_ids=segment_ids, segment_rows=image_grid_thw, interp_indices=indices,
                     interp_weights=weights)
        return (out.pooler_output, *(getattr(out, "deepstack_features", None) or ()))


def embed(visual: Qwen3Vision, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """The reference's embedding: patches plus the position table resampled to each grid, by
    transformers' own host computation of the taps."""
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid_thw, visual.num_grid_per_side, mode="bilinear", align_corners=True,
        spatial_merge_size=visual.spatial_merge_size)
    return visual.patch_embed(pixel_values) + (visual.pos_embed(indices) * weights[:, :, None]).sum(1)


def image_processor(config: Qwen3VLVisionConfig | Qwen3_5VisionConfig) -> dict:
    """transformers' PIL-based Qwen2-VL processor (what both families' processors use), patch 16,
    mean and std 0.5; a checkpoint's preprocessor_config.json overrides each setting it names."""
    return {"class": "Qwen2VLImageProcessorPil",
            "kwargs": {"patch_size": config.patch_size, "temporal_patch_size": config.temporal_patch_size,
                       "merge_size": config.spatial_merge_size, "image_mean": [0.5, 0.5, 0.5],
                       "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 1280}}}


def tower_shape(config: Qwen3VLVisionConfig | Qwen3_5VisionConfig) -> TowerShape:
    """The cost model's sizes; MLP: fc1 and fc2 of the intermediate width; every block attends
    within each image or slice; each DeepStack tap's merger costs what the final one does."""
    d = config.hidden_size
    return TowerShape(config.depth, d, config.in_channels * config.temporal_patch_size * config.patch_size ** 2,
                      2 * d * config.intermediate_size, merger_macs(d, config.spatial_merge_size, config.out_hidden_size),
                      config.spatial_merge_size ** 2, heads=1 + len(getattr(config, "deepstack_visual_indexes", ())))


def stock_flops(config: Qwen3VLVisionConfig | Qwen3_5VisionConfig, grid_thw: torch.Tensor) -> int:
    """FLOPs of the stock module on one call (`cost.slice_attention_stock_flops`)."""
    return cost.slice_attention_stock_flops(tower_shape(config), grid_thw)


def deepstack_taps(visual: Qwen3VLVisionModel) -> list[tuple[int, torch.nn.Module]]:
    """(block, merger) of each DeepStack output, in the order the stock module returns them."""
    return list(zip(visual.deepstack_visual_indexes, visual.deepstack_merger_list))


QWEN3_5 = ModelDescription(
    architecture="qwen3_5",
    model_types=("qwen3_5",),
    weight_prefixes=("model.visual.", "visual."),
    block_path=r"blocks\.(\d+)$",
    build=sdpa_builder(Qwen3_5VisionConfig, Qwen3_5VisionModel),
    exportable=ExportableQwen3Vision,
    attention_context=attention.packed,
    image_processor=image_processor,
    query_projection=(r"attn\.qkv$", 0, 3),
    tower_shape=tower_shape,
    stock_flops=stock_flops,
    embed=embed,
    run_block=run_block,
    run_stabilized_block=run_stabilized_block,
)

QWEN3_VL = dataclasses.replace(QWEN3_5, architecture="qwen3_vl", model_types=("qwen3_vl",),
                               build=sdpa_builder(Qwen3VLVisionConfig, Qwen3VLVisionModel),
                               taps=deepstack_taps)
"""Qwen3.5's description plus DeepStack: its tapped blocks' outputs leave through their own mergers."""
