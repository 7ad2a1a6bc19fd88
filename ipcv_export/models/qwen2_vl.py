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
import torch.nn.functional as F
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (Qwen2VisionTransformerPretrainedModel,
                                                            apply_rotary_pos_emb_vision)

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


def run_block(block: torch.nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              seg: torch.Tensor) -> torch.Tensor:
    """A Qwen vision block's own forward on tokens x with their rotary (cos, sin) and segment ids. Its attention takes contiguous runs (cu_seqlens), so tokens are
    grouped by segment first (a stable sort: the identity when segments are already runs) and
    put back after; everything else in a block acts on each token alone."""
    order = torch.sort(seg, stable=True).indices
    counts = torch.unique_consecutive(seg[order], return_counts=True)[1]
    cu = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    out = block(x[order], cu_seqlens=cu, position_embeddings=(cos[order], sin[order]))
    return torch.empty_like(out).index_copy_(0, order, out)


def run_stabilized_block(block: torch.nn.Module, z: torch.Tensor, y: torch.Tensor, keep: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """A Qwen vision block as an AS block (ipcv.md, step 3): keys and values from all N rows of z,
    queries and outputs for the kept rows y only."""
    attn = block.attn
    n, heads = z.shape[0], attn.num_heads
    q, k, v = attn.qkv(block.norm1(z)).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q = q[keep]
    mask = seg[keep][:, None] == seg[None, :]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=attn.scaling)
    y = y + attn.proj(out.transpose(0, 1).reshape(len(keep), -1))
    return y + block.mlp(block.norm2(y))


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
    run_block=run_block,
    run_stabilized_block=run_stabilized_block,
)
