"""LLaVA's vision side: a ViT whose chosen layer feeds the multi-modal projector, as
`get_image_features` runs it, for two families:

- LLaVA-1.5 (`llava`): CLIP ViT-L/14-336 (CLS token, pre-LN); the LLM reads layer -2 (the output
  of the second-to-last block) without the CLS token, through the projector (linear, GELU, linear).
- LLaVA-OneVision (`llava_onevision`): SigLIP so400m-patch14-384 (no CLS, no pre-LN); the LLM
  reads layer -1 (the last block's output, before SigLIP's post-LayerNorm) with every token.
  The file covers each 384 px tile up to the projector; the any-res packing of tiles into the
  LLM's sequence (a reshape and newline tokens, no compute) stays with the runtime.

The exported module runs only the blocks up to the feature layer: IPCV reintegrates after the
last of them, and later blocks are not in the graph at all. Images: [B, 3, H, W], B the dynamic
number of images or tiles; the position table is resized to the input grid, which at the
released size reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from transformers import AutoModel, LlavaConfig, LlavaOnevisionConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionMultiModalProjector

from . import attention
from .cost import TowerShape
from .description import ImageBatch, ModelDescription, TowerParts
from .image_batch import ExportableImageBatch
from .positions import resized_positions


@dataclass(frozen=True)
class LlavaFamily:
    """What differs between the LLaVA families: config and projector classes, whether the tower has
    a CLS token (class_embedding) and a pre-LayerNorm, and the image processor."""

    config: type
    projector: type
    special_tokens: int
    pre_norm: bool
    processor: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


LLAVA_1_5 = LlavaFamily(LlavaConfig, LlavaMultiModalProjector, 1, True, "CLIPImageProcessorPil",
                        OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
LLAVA_ONEVISION = LlavaFamily(LlavaOnevisionConfig, LlavaOnevisionMultiModalProjector, 0, False,
                              "SiglipImageProcessorPil", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


class LlavaVisionSide(torch.nn.Module):
    """The stock vision tower and projector of a LLaVA model, under their checkpoint names."""

    def __init__(self, config, family: LlavaFamily) -> None:
        super().__init__()
        self.config = config
        self.family = family
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = family.projector(config)

    @property
    def feature_blocks(self) -> int:
        """How many blocks run before the layer the LLM reads (hidden_states[vision_feature_layer])."""
        layer = self.config.vision_feature_layer
        return layer if layer >= 0 else self.config.vision_config.num_hidden_layers + 1 + layer


def embed(side: LlavaVisionSide, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embedding, CLS first (CLIP), positions resized to the grid, the pre-LayerNorm (CLIP)."""
    tower, patch, special = side.vision_tower, side.config.vision_config.patch_size, side.family.special_tokens
    tokens = tower.embeddings.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
    if special:
        tokens = torch.cat([tower.embeddings.class_embedding.expand(tokens.shape[0], 1, -1), tokens], 1)
    rows, cols = pixel_values.shape[2] // patch, pixel_values.shape[3] // patch
    tokens = tokens + resized_positions(tower.embeddings.position_embedding.weight[None], special, rows, cols)
    return tower.pre_layrnorm(tokens) if side.family.pre_norm else tokens


def head(side: LlavaVisionSide, hidden: torch.Tensor, columns: int) -> torch.Tensor:
    """What the LLM consumes: the selected layer's tokens (without the first by default), projected
    token by token (the grid's shape does not matter)."""
    if side.config.vision_feature_select_strategy == "default":
        # a gather, not a slice: a strided slice's contiguity check would make the exporter guard B != 1
        hidden = hidden.index_select(1, torch.arange(1, hidden.shape[1], device=hidden.device))
    return side.multi_modal_projector(hidden)


def parts(side: LlavaVisionSide) -> TowerParts:
    layers = side.vision_tower.encoder.layers[:side.feature_blocks]
    return TowerParts(partial(embed, side), [partial(layer, attention_mask=None) for layer in layers], partial(head, side),
                      side.config.vision_config.patch_size)


def builder(family: LlavaFamily):
    def build(config: dict) -> LlavaVisionSide:
        """The whole config.json (the projector needs the LLM's width and the feature layer)."""
        whole = family.config(**config)
        whole.vision_config._attn_implementation = "sdpa"
        return LlavaVisionSide(whole, family).eval()
    return build


def image_processor(config) -> dict:
    """transformers' PIL-based processor of the tower, at its native size (one tile)."""
    vision, family = config.vision_config, FAMILIES[config.model_type]
    side = vision.image_size
    return {"class": family.processor,
            "kwargs": {"size": {"height": side, "width": side}, "image_mean": list(family.mean),
                       "image_std": list(family.std)}}


def tower_shape(config) -> TowerShape:
    """The cost model's sizes for one image: the blocks up to the feature layer, then the projector
    on every token the LLM reads."""
    vision, out = config.vision_config, config.text_config.hidden_size
    d = vision.hidden_size
    layer = config.vision_feature_layer
    depth = layer if layer >= 0 else vision.num_hidden_layers + 1 + layer
    special = FAMILIES[config.model_type].special_tokens
    return TowerShape(depth, d, vision.num_channels * vision.patch_size ** 2, 2 * d * vision.intermediate_size,
                      head_macs=d * out + out * out, special_tokens=special)


FAMILIES = {"llava": LLAVA_1_5, "llava_onevision": LLAVA_ONEVISION}
# transformers 5 saves the module names as they are; llava-hf's releases nest the tower under
# vision_model; some conversions prefix everything with model.
WEIGHT_NAMES = ("",
                {"vision_tower.vision_model.": "vision_tower.", "multi_modal_projector.": "multi_modal_projector."},
                {"model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."})


def description(architecture: str, model_type: str) -> ModelDescription:
    family = FAMILIES[model_type]
    return ModelDescription(
        architecture=architecture,
        model_types=(model_type,),
        weight_prefixes=WEIGHT_NAMES,
        block_path=r"vision_tower\.encoder\.layers\.(\d+)$",
        build=builder(family),
        exportable=partial(ExportableImageBatch, parts=parts),
        attention_context=attention.batched,
        image_processor=image_processor,
        query_projection=(r"self_attn\.q_proj$", 0, 1),
        tower_shape=tower_shape,
        image_batch=ImageBatch(special_tokens=family.special_tokens, parts=parts),
        whole_config=True,
    )


LLAVA_CLIP = description("llava_clip", "llava")
LLAVA_ONEVISION_SIGLIP = description("llava_onevision_siglip", "llava_onevision")
