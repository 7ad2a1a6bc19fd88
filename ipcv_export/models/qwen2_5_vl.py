"""Qwen2.5-VL's vision tower: Qwen2-VL's packed layout with RMSNorm, a gated MLP and windows.

Most blocks attend within windows of window_size pixels (8 x 8 patches), the blocks listed in
`fullatt_block_indexes` within each image. The stock forward regroups tokens window by window so
that each window is a contiguous run for varlen kernels, then restores the order after the merger.
Attention restricted by segment ids needs no contiguity, so the exportable module keeps the
processor's token order throughout and gives each block its segment ids instead: window ids in
window blocks, image ids in full blocks. Same result as the stock module (each token's output
depends only on the tokens of its window), no gather or argsort of N-sized data in the graph,
and the same engine inputs as Qwen2-VL. The one visible difference: the order in which IPCV
breaks ties between equal importance scores is the processor's, not the stock window order.
"""

from __future__ import annotations

import torch
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

from . import attention
from .cost import TowerShape, ipcv_flops, merger_macs
from .description import ModelDescription
from .qwen2_vl import image_processor

WINDOW_ID_STRIDE = 2 ** 16
"""Window ids are (segment * stride + window row) * stride + window column: unique while an image
has fewer than 65536 windows per side."""


def block_segments(config: Qwen2_5_VLVisionConfig, positions: torch.Tensor, segments: torch.Tensor) -> list[torch.Tensor]:
    """Per block: window ids (window blocks) or the image segment ids (full-attention blocks).

    Windows tile each image slice from its top-left corner in squares of window_size // patch_size
    patches, as the stock `get_vision_window_index` tiles the merged grid (partial windows at the
    bottom and right edges).
    """
    side = config.window_size // config.patch_size
    # positions are non-negative, so truncation is floor division; it lowers to one integer Div
    # (floor division of signed integers adds a sign test on booleans, which TensorRT rejects)
    window = torch.div(positions, side, rounding_mode="trunc")
    windows = (segments * WINDOW_ID_STRIDE + window[:, 0]) * WINDOW_ID_STRIDE + window[:, 1]
    return [segments if index in config.fullatt_block_indexes else windows for index in range(config.depth)]


class ExportableQwen25VLVision(torch.nn.Module):
    """(pixel_values, position_ids, segment_ids) -> merged embeddings, from the stock submodules."""

    def __init__(self, visual: Qwen2_5_VisionTransformerPretrainedModel) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
        visual = self.visual
        hidden = visual.patch_embed(pixel_values)
        rotary = visual.rotary_pos_emb(hidden, position_ids)
        for block, segments in zip(visual.blocks, block_segments(visual.config, position_ids, segment_ids)):
            # cu_seqlens / max_seqlen are required by the stock signature but unused by the registered
            # attention, which reads segment_ids (see qwen2_vl.ExportableQwen2VLVision).
            hidden = block(hidden, cu_seqlens=segments, max_seqlen=0, position_embeddings=rotary, segment_ids=segments)
        return visual.merger(hidden)


def flop_floor(config: Qwen2_5_VLVisionConfig, retention_e4: int, prune_layer: int, as_depth: int, tokens: int,
               selection: str = "score") -> int:
    """ipcv.md's cost model (see `cost.ipcv_flops`); MLP: gated, three d x intermediate products.
    Window blocks cost as much as full ones here: the file's attention is dense, masked by segment."""
    shape = TowerShape(config.depth, config.hidden_size,
                       config.in_channels * config.temporal_patch_size * config.patch_size ** 2,
                       3 * config.hidden_size * config.intermediate_size,
                       merger_macs(config.hidden_size, config.spatial_merge_size, config.out_hidden_size),
                       config.spatial_merge_size ** 2)
    return ipcv_flops(shape, retention_e4, prune_layer, as_depth, tokens, selection)


def build(vision_config: dict) -> Qwen2_5_VisionTransformerPretrainedModel:
    config = Qwen2_5_VLVisionConfig(**vision_config)
    config._attn_implementation = "sdpa"
    return Qwen2_5_VisionTransformerPretrainedModel(config).eval()


QWEN2_5_VL = ModelDescription(
    architecture="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    weight_prefixes=("visual.", "model.visual."),
    block_path=r"blocks\.(\d+)$",
    build=build,
    exportable=ExportableQwen25VLVision,
    attention_context=attention.packed,
    image_processor=image_processor,
    query_projection=(r"attn\.qkv$", 0, 3),
    flop_floor=flop_floor,
    block_segments=block_segments,
)
