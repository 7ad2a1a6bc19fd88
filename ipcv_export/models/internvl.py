"""InternVL's vision side: InternViT (CLS token, LayerScale, learned absolute positions) up to the
layer the LLM reads, then the pixel shuffle and the multi-modal projector, as
`InternVLModel.get_image_features` runs it.

Each 448 px tile is one image of the batch ([B, 3, H, W], B the dynamic number of tiles); the
tiling of a picture into tiles and the packing of tiles into the LLM's sequence stay with the
runtime. The pixel shuffle folds every 2 x 2 group of patch tokens (downsample_ratio 0.5) into
one token of 4x the width, so each side of the grid must be a multiple of 2 patches
(`ImageBatch.grid_multiple`). The authors' IPCV code searches a removed token's neighbours among
the kept tokens of all tiles of a call: `neighbors_across_images` (ipcv.md), defaults l_p = 7, Δ = 3.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import InternVLConfig
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.internvl.modeling_internvl import InternVLMultiModalProjector

from . import attention
from .cost import TowerShape
from .description import ImageBatch, ModelDescription, TowerParts, square_side
from .image_batch import ExportableImageBatch
from .llava import WEIGHT_NAMES, LlavaFamily, LlavaVisionSide, builder
from .positions import resized_positions

INTERNVL_FAMILY = LlavaFamily(InternVLConfig, InternVLMultiModalProjector, 1, False, "GotOcr2ImageProcessorPil",
                              IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)


def shuffle_factor(config: InternVLConfig) -> int:
    """Patches folded per side by the pixel shuffle (2 for downsample_ratio 0.5)."""
    return round(1 / config.downsample_ratio)


def embed(side: LlavaVisionSide, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS first, positions resized to the grid (the stock resize is the same
    bicubic one, taken only away from the native size)."""
    embeddings, p = side.vision_tower.embeddings, square_side(side.config.vision_config.patch_size)
    patches = embeddings.patch_embeddings(pixel_values)
    tokens = torch.cat([embeddings.cls_token.expand(patches.shape[0], -1, -1), patches], 1)
    rows, cols = pixel_values.shape[2] // p, pixel_values.shape[3] // p
    return tokens + resized_positions(embeddings.position_embeddings, 1, rows, cols)


def head(side: LlavaVisionSide, hidden: torch.Tensor, columns: int) -> torch.Tensor:
    """What the LLM consumes: the feature layer's patch tokens (CLS dropped), pixel-shuffled on the
    tile's grid of `columns` patches a row, projected. The shuffle is the stock one written with
    integer sizes (the stock code rounds float products, which a symbolic shape cannot take)."""
    if side.config.vision_feature_layer == -1:
        hidden = side.vision_tower.layernorm(hidden)
    if side.config.vision_feature_select_strategy == "default":
        hidden = hidden.index_select(1, torch.arange(1, hidden.shape[1], device=hidden.device))
    f = shuffle_factor(side.config)
    batch, patches, width = hidden.shape
    rows = patches // columns
    grid = hidden.reshape(batch, rows, columns // f, width * f).permute(0, 2, 1, 3)
    grid = grid.reshape(batch, columns // f, rows // f, width * f * f).permute(0, 2, 1, 3)
    return side.multi_modal_projector(grid.reshape(batch, -1, width * f * f))


def parts(side: LlavaVisionSide) -> TowerParts:
    return TowerParts(partial(embed, side), list(side.vision_tower.encoder.layer[:side.feature_blocks]),
                      partial(head, side), square_side(side.config.vision_config.patch_size))


def image_processor(config: InternVLConfig) -> dict:
    """transformers' PIL processor of InternVL (GOT-OCR2's), one 448 px tile, ImageNet statistics."""
    side = square_side(config.vision_config.image_size)
    return {"class": INTERNVL_FAMILY.processor,
            "kwargs": {"size": {"height": side, "width": side}, "crop_to_patches": False,
                       "image_mean": list(INTERNVL_FAMILY.mean), "image_std": list(INTERNVL_FAMILY.std)}}


def tower_shape(config: InternVLConfig) -> TowerShape:
    """The cost model's sizes for one tile: the blocks up to the feature layer, then the projector
    on every shuffled token (one per f x f patches)."""
    vision, out, f = config.vision_config, config.text_config.hidden_size, shuffle_factor(config)
    d, layer = vision.hidden_size, config.vision_feature_layer
    depth = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
    patch_width = vision.num_channels * square_side(vision.patch_size) ** 2
    return TowerShape(depth, d, patch_width, 2 * d * vision.intermediate_size,
                      head_macs=d * f * f * out + out * out, head_group=f * f, special_tokens=1)


INTERNVL_VIT = ModelDescription(
    architecture="internvl_vit",
    model_types=("internvl",),
    weight_prefixes=WEIGHT_NAMES,
    block_path=r"vision_tower\.encoder\.layer\.(\d+)$",
    build=builder(INTERNVL_FAMILY),
    exportable=partial(ExportableImageBatch, parts=parts),
    attention_context=attention.batched,
    image_processor=image_processor,
    query_projection=(r"attention\.q_proj$", 0, 1),
    tower_shape=tower_shape,
    image_batch=ImageBatch(special_tokens=1, parts=parts, grid_multiple=2, neighbors_across_images=True),
    whole_config=True,
    method_defaults={"prune_layer": 7, "as_depth": 3},
)
