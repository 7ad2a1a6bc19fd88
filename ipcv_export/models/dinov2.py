"""DINOv2's ViT: a tower that batches whole images, with a CLS token and LayerScale.

Input [B, 3, H, W] with H and W multiples of the patch size; tokens [B, 1 + (H/p)(W/p), D] with
the CLS token first; the output is the final LayerNorm's tokens (what a DINOv2 feature user reads).
The learned position table (a 37 x 37 grid for the released models) is resized to every input
grid (`positions.resized_positions`).
"""

from __future__ import annotations

from functools import partial

import torch
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.dinov2.configuration_dinov2 import Dinov2Config
from transformers.models.dinov2.modeling_dinov2 import Dinov2Model

from . import attention
from .cost import TowerShape
from .description import ImageBatch, ModelDescription, TowerParts, sdpa_builder
from .image_batch import ExportableImageBatch
from .positions import resized_positions


def embed(model: Dinov2Model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS token first, then the position table resized to the input's grid."""
    embeddings, patch = model.embeddings, model.config.patch_size
    patches = embeddings.patch_embeddings(pixel_values)
    tokens = torch.cat([embeddings.cls_token.expand(patches.shape[0], -1, -1), patches], 1)
    rows, cols = pixel_values.shape[2] // patch, pixel_values.shape[3] // patch
    return tokens + resized_positions(embeddings.position_embeddings, 1, rows, cols)


def head(model: Dinov2Model, hidden: torch.Tensor, columns: int) -> torch.Tensor:
    """The final LayerNorm (a per-token head: the grid's shape does not matter)."""
    return model.layernorm(hidden)


def parts(model: Dinov2Model) -> TowerParts:
    return TowerParts(partial(embed, model), list(model.encoder.layer), partial(head, model), model.config.patch_size)


def image_processor(config: Dinov2Config) -> dict:
    """transformers' PIL-based BitImageProcessor as DINOv2 checkpoints configure it, without the
    224 crop: the shorter side is resized to 224 and the other one rounded to a patch multiple
    by the caller (see runtime)."""
    return {"class": "BitImageProcessorPil",
            "kwargs": {"do_center_crop": False, "size": {"shortest_edge": 224}, "image_mean": list(IMAGENET_DEFAULT_MEAN),
                       "image_std": list(IMAGENET_DEFAULT_STD), "do_convert_rgb": True}}


def tower_shape(config: Dinov2Config) -> TowerShape:
    """The cost model's sizes for one image plus the CLS token (no merger)."""
    d = config.hidden_size
    return TowerShape(config.num_hidden_layers, d, config.num_channels * config.patch_size ** 2,
                      2 * d * int(d * config.mlp_ratio), special_tokens=1)


DINOV2 = ModelDescription(
    architecture="dinov2",
    model_types=("dinov2",),
    weight_prefixes=("", "dinov2.", "backbone."),
    block_path=r"encoder\.layer\.(\d+)$",
    build=sdpa_builder(Dinov2Config, Dinov2Model),
    exportable=partial(ExportableImageBatch, parts=parts),
    attention_context=attention.batched,
    image_processor=image_processor,
    query_projection=(r"attention\.q_proj$", 0, 1),
    tower_shape=tower_shape,
    image_batch=ImageBatch(special_tokens=1, parts=parts),
)
