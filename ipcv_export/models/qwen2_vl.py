"""Qwen2-VL's vision tower: where its parts are, and how to call the stock module for export.

Capture path: the stock `transformers` module, unmodified. Its forward accepts precomputed
`position_ids` and `cu_seqlens` (transformers' `vision_utils` pops them from the keyword
arguments), and its attention calls whatever function is registered under the configured name.
Segment ids travel as one more keyword argument down to that function (see `ipcv_export.ops`).
Both come from `image_grid_thw` inside the graph (`inputs.grid_layout`), so the file's inputs are
what the processor gives: pixel_values and image_grid_thw.
"""

from __future__ import annotations

import torch
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from . import attention, cost
from .cost import TowerShape, merger_macs
from .description import ModelDescription, sdpa_builder


class ExportableQwen2VLVision(torch.nn.Module):
    """(pixel_values, image_grid_thw) -> merged embeddings, through the stock module."""

    def __init__(self, visual: Qwen2VisionTransformerPretrainedModel) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        position_ids, segment_ids = torch.ops.ipcv.grid_layout(image_grid_thw, pixel_values,
                                                               self.visual.config.spatial_merge_size)
        # cu_seqlens is required by the stock forward but unused by the registered attention,
        # which reads segment_ids instead; max_seqlen is likewise only read by flash kernels.
        return self.visual(pixel_values, grid_thw=None, position_ids=position_ids, cu_seqlens=segment_ids,
                           max_seqlen=0, segment_ids=segment_ids, segment_rows=image_grid_thw).pooler_output


def image_processor(config: Qwen2VLVisionConfig) -> dict:
    """transformers' PIL-based Qwen2-VL processor with the released models' defaults."""
    return {"class": "Qwen2VLImageProcessorPil",
            "kwargs": {"patch_size": config.patch_size, "temporal_patch_size": config.temporal_patch_size,
                       "merge_size": config.spatial_merge_size, "image_mean": list(OPENAI_CLIP_MEAN),
                       "image_std": list(OPENAI_CLIP_STD), "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}}}


def tower_shape(config: Qwen2VLVisionConfig) -> TowerShape:
    """The cost model's sizes; MLP: fc1 and fc2 of width d * mlp_ratio."""
    d = config.embed_dim
    return TowerShape(config.depth, d, config.in_channels * config.temporal_patch_size * config.patch_size ** 2,
                      2 * d * int(d * config.mlp_ratio), merger_macs(d, config.spatial_merge_size, config.hidden_size),
                      config.spatial_merge_size ** 2)


def stock_flops(config: Qwen2VLVisionConfig, grid_thw: torch.Tensor) -> int:
    """FLOPs of the stock module on one call (`cost.slice_attention_stock_flops`)."""
    return cost.slice_attention_stock_flops(tower_shape(config), grid_thw)


QWEN2_VL = ModelDescription(
    architecture="qwen2_vl",
    model_types=("qwen2_vl",),
    weight_prefixes=("visual.", "model.visual."),
    block_path=r"blocks\.(\d+)$",
    build=sdpa_builder(Qwen2VLVisionConfig, Qwen2VisionTransformerPretrainedModel),
    exportable=ExportableQwen2VLVision,
    attention_context=attention.packed,
    image_processor=image_processor,
    query_projection=(r"attn\.qkv$", 0, 3),
    tower_shape=tower_shape,
    stock_flops=stock_flops,
)
