"""LLaVA-1.5's vision side: a CLIP ViT (CLS token, pre-LN) whose penultimate layer feeds the
multi-modal projector, as `LlavaModel.get_image_features` runs it.

The LLM consumes layer `vision_feature_layer` (-2: the output of the second-to-last block) with the
CLS token dropped ("default" strategy), through the projector (linear, GELU, linear). So the
exported module runs only the blocks up to that layer: IPCV reintegrates after the last of them,
and the blocks after it are not in the graph at all. Images: [B, 3, H, W], B the dynamic number of
images or any-res tiles; the position table is resized to the input grid, which at 336 px (the
released size) reproduces it exactly.
"""

from __future__ import annotations

from functools import partial

import torch
from transformers import LlavaConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.clip.modeling_clip import CLIPVisionModel
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from . import attention
from .cost import TowerShape, ipcv_flops
from .description import ImageBatch, ModelDescription, TowerParts
from .positions import resized_positions


class LlavaVisionSide(torch.nn.Module):
    """The stock CLIP tower and projector of a LLaVA model, under their checkpoint names."""

    def __init__(self, config: LlavaConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)

    @property
    def feature_blocks(self) -> int:
        """How many blocks run before the layer the LLM reads (hidden_states[vision_feature_layer])."""
        layer = self.config.vision_feature_layer
        return layer if layer >= 0 else self.config.vision_config.num_hidden_layers + 1 + layer


def embed(side: LlavaVisionSide, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS first, positions resized to the grid, then the pre-LayerNorm."""
    tower, patch = side.vision_tower, side.config.vision_config.patch_size
    patches = tower.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    tokens = torch.cat([tower.embeddings.class_embedding.expand(patches.shape[0], 1, -1), patches], 1)
    rows, cols = pixel_values.shape[2] // patch, pixel_values.shape[3] // patch
    tokens = tokens + resized_positions(tower.embeddings.position_embedding.weight[None], 1, rows, cols)
    return tower.pre_layrnorm(tokens)


def head(side: LlavaVisionSide, hidden: torch.Tensor) -> torch.Tensor:
    """What the LLM consumes: the selected layer's tokens (without CLS by default), projected."""
    if side.config.vision_feature_select_strategy == "default":
        # a gather, not a slice: a strided slice's contiguity check would make the exporter guard B != 1
        hidden = hidden.index_select(1, torch.arange(1, hidden.shape[1], device=hidden.device))
    return side.multi_modal_projector(hidden)


def parts(side: LlavaVisionSide) -> TowerParts:
    layers = side.vision_tower.encoder.layers[:side.feature_blocks]
    return TowerParts(partial(embed, side), [partial(layer, attention_mask=None) for layer in layers], partial(head, side),
                      side.config.vision_config.patch_size)


class ExportableLlavaVision(torch.nn.Module):
    """pixel_values [B, 3, H, W] -> image features [B, P, text width], through the stock modules."""

    def __init__(self, side: LlavaVisionSide) -> None:
        super().__init__()
        self.side = side

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = embed(self.side, pixel_values)
        for layer in self.side.vision_tower.encoder.layers[:self.side.feature_blocks]:
            hidden = layer(hidden, None)
        return head(self.side, hidden)


def build(config: dict) -> LlavaVisionSide:
    """The whole LLaVA config.json (the projector needs the LLM's width and the feature layer)."""
    llava = LlavaConfig(**config)
    llava.vision_config._attn_implementation = "sdpa"
    return LlavaVisionSide(llava).eval()


def image_processor(config: LlavaConfig) -> dict:
    """transformers' PIL-based CLIP processor as LLaVA-1.5 configures it (336 px, CLIP mean/std)."""
    side = config.vision_config.image_size
    return {"class": "CLIPImageProcessorPil",
            "kwargs": {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side},
                       "image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD)}}


def flop_floor(config: LlavaConfig, retention_e4: int, prune_layer: int, as_depth: int, tokens: int) -> int:
    """ipcv.md's cost model for one image: the blocks up to the feature layer, then the projector
    on every patch token (CLS dropped)."""
    vision, out = config.vision_config, config.text_config.hidden_size
    d = vision.hidden_size
    layer = config.vision_feature_layer
    depth = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
    shape = TowerShape(depth, d, vision.num_channels * vision.patch_size ** 2, 2 * d * vision.intermediate_size,
                       head_macs=d * out + out * out, special_tokens=1)
    return ipcv_flops(shape, retention_e4, prune_layer, as_depth, tokens)


LLAVA_CLIP = ModelDescription(
    architecture="llava_clip",
    model_types=("llava",),
    # transformers 5 saves the module names as they are; llava-hf's releases nest the tower under
    # vision_model; some conversions prefix everything with model.
    weight_prefixes=("",
                     {"vision_tower.vision_model.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector."},
                     {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."}),
    block_path=r"vision_tower\.encoder\.layers\.(\d+)$",
    build=build,
    exportable=ExportableLlavaVision,
    attention_context=attention.batched,
    image_processor=image_processor,
    query_projection=(r"self_attn\.q_proj$", 0, 1),
    flop_floor=flop_floor,
    image_batch=ImageBatch(special_tokens=1, parts=parts),
    whole_config=True,
)
