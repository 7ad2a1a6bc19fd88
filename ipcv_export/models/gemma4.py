"""Gemma 4's vision side: a ViT over padded patch sequences, pooled by position, then projected
into the LLM's width, as `Gemma4Model.get_image_features` runs it.

The processor cuts every image into 16 x 16 patches (sides multiples of k = 3 patches), pads each
image's sequence to one length P = 9 * max_soft_tokens, and gives (pixel_values [B, P, 3 * 16^2],
image_position_ids [B, P, 2] as (x, y), -1 for padding). The tower masks padding out of attention
(as keys), rotates queries and keys by a 2D RoPE of the positions, then averages each k x k cell of
patches into one soft token (`pool`), scales by sqrt(hidden), optionally standardises, and the
multimodal embedder (an RMSNorm without scale, a linear layer) projects it for the LLM.

The file returns [B, P / k^2, LLM hidden]: image b's soft tokens are its first S_b rows (S_b = its
real patches / k^2, the processor's num_soft_tokens_per_image) and the rest are zero. The stock
module returns the same rows concatenated ([sum S_b, hidden]), a size that depends on the values
of the positions, which TensorRT's static shapes cannot express.

Everything the stock code does with operators a static TensorRT graph refuses is written here in
graph-safe form from the stock parameters: integer clamping becomes a maximum, the pooler's one-hot
a comparison with an arange (whose length follows from P: `F.one_hot` would pin P in the capture).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from transformers.models.gemma4 import Gemma4Config
from transformers.models.gemma4.modeling_gemma4 import Gemma4MultimodalEmbedder, Gemma4VisionModel

from ..inputs import div, real_patches
from . import attention
from .cost import TowerShape
from .description import ModelDescription, PaddedParts, PaddedPatches


class Gemma4VisionSide(torch.nn.Module):
    """The stock vision tower and multimodal embedder of a Gemma 4 model, under their checkpoint names."""

    def __init__(self, config: Gemma4Config) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = Gemma4VisionModel(config.vision_config)
        self.embed_vision = Gemma4MultimodalEmbedder(config.vision_config, config.text_config)


def build(config: dict) -> Gemma4VisionSide:
    """The whole config.json (the embedder needs the LLM's width); the LLM itself is not built."""
    whole = Gemma4Config(**config)
    whole.vision_config._attn_implementation = "sdpa"
    return Gemma4VisionSide(whole).eval()


def embed(side: Gemma4VisionSide, pixel_values: torch.Tensor, positions: torch.Tensor,
          padding: torch.Tensor) -> torch.Tensor:
    """The stock patch embedder: pixels mapped from [0, 1] to [-1, 1], projected, plus the learned
    x and y position rows (none for padding)."""
    embedder = side.vision_tower.patch_embedder
    weight = embedder.input_proj.weight
    tokens = embedder.input_proj((2 * (pixel_values - 0.5)).to(weight.dtype))
    at = torch.maximum(positions, torch.zeros_like(positions))  # padding's -1 read as row 0, then zeroed
    table = embedder.position_embedding_table
    rows = torch.nn.functional.embedding(at[..., 0], table[0]) + torch.nn.functional.embedding(at[..., 1], table[1])
    return tokens + torch.where(padding.unsqueeze(-1), torch.zeros_like(rows), rows)


def pool(side: Gemma4VisionSide, hidden: torch.Tensor, positions: torch.Tensor,
         padding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The stock pooler: the mean of each k x k cell of patches (cell index x // k + (W / k)(y // k),
    W the image's width in patches), scaled by sqrt(hidden), in fp32; and which of the P / k^2 cells
    hold a patch ([B, L] bool)."""
    k = side.config.vision_config.pooling_kernel_size
    length = hidden.shape[1] // (k * k)
    hidden = hidden.masked_fill(padding.unsqueeze(-1), 0.0)
    at = torch.maximum(positions, torch.zeros_like(positions))
    width = at[..., 0].amax(-1, keepdim=True) + 1
    cell = div(at[..., 0], k) + div(width, k) * div(at[..., 1], k)
    weights = (cell.unsqueeze(-1) == torch.arange(length, device=cell.device)).to(torch.float32) / (k * k)
    pooled = weights.transpose(1, 2) @ hidden.float()
    return pooled * math.sqrt(side.config.vision_config.hidden_size), weights.amax(1) > 0


def head(side: Gemma4VisionSide, hidden: torch.Tensor, positions: torch.Tensor,
         padding: torch.Tensor) -> torch.Tensor:
    """Pooling, the optional standardisation, the multimodal embedder; cells without a patch zero."""
    tower = side.vision_tower
    pooled, filled = pool(side, hidden, positions, padding)
    if tower.config.standardize:
        pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
    features = side.embed_vision(pooled.to(hidden.dtype))
    return torch.where(filled.unsqueeze(-1), features, torch.zeros_like(features))


class ExportableGemma4(torch.nn.Module):
    """(pixel_values [B, P, 3 p^2], image_position_ids [B, P, 2]) -> soft tokens [B, P / k^2, hidden].
    The blocks are the stock layers, called one by one with the per-image token ids (1 real patch,
    0 padding) that `ipcv::segment_attention` masks by."""

    def __init__(self, side: Gemma4VisionSide) -> None:
        super().__init__()
        self.side = side

    def forward(self, pixel_values: torch.Tensor, image_position_ids: torch.Tensor) -> torch.Tensor:
        tower = self.side.vision_tower
        valid = torch.ops.ipcv.valid_tokens(image_position_ids)
        padding = valid == 0
        hidden = embed(self.side, pixel_values, image_position_ids, padding)
        rotary = tower.encoder.rotary_emb(hidden, image_position_ids)
        for layer in tower.encoder.layers:
            hidden = layer(hidden, position_embeddings=rotary, attention_mask=None, position_ids=image_position_ids,
                           segment_ids=valid)
        return head(self.side, hidden, image_position_ids, padding)


def stock_features(side: Gemma4VisionSide, pixel_values: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """What users run today: the stock tower, then the embedder, as `get_image_features` calls them;
    [sum of soft tokens, hidden], the images' soft tokens one after the other."""
    with torch.no_grad():
        hidden = side.vision_tower(pixel_values=pixel_values, pixel_position_ids=position_ids).last_hidden_state
        return side.embed_vision(hidden)


def image_processor(config: Gemma4Config) -> dict:
    """transformers' PIL-based Gemma 4 processor with the tower's patch and pooling sizes, at its
    default budget of 280 soft tokens (P = 2520 patches)."""
    vision = config.vision_config
    return {"class": "Gemma4ImageProcessorPil",
            "kwargs": {"patch_size": vision.patch_size, "pooling_kernel_size": vision.pooling_kernel_size,
                       "max_soft_tokens": 280}}


def tower_shape(config: Gemma4Config) -> TowerShape:
    """The cost model's sizes for one image: a gated MLP (three matrices), the pooler's weight product
    over k^2-patch cells, the embedder per soft token. The heads' width must be the tower's (it is in
    the released configs: 12 x 64 = 768), as the cost model's projections assume."""
    vision = config.vision_config
    d, square = vision.hidden_size, vision.pooling_kernel_size ** 2
    if vision.num_attention_heads * vision.head_dim != d or vision.num_key_value_heads != vision.num_attention_heads:
        raise ValueError("the cost model prices attention heads as wide as the tower, with as many key/value heads")
    return TowerShape(vision.num_hidden_layers, d, 3 * vision.patch_size ** 2, 3 * d * vision.intermediate_size,
                      head_macs=d * config.text_config.hidden_size, head_group=square, pooled=square)


def reference_parts(side: Gemma4VisionSide) -> PaddedParts:
    """The stock patch embedder, encoder layers (no padding, so no mask), pooler, standardisation
    and embedder, as `reference.padded_reference` runs them."""
    tower = side.vision_tower

    def embed(pixels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return tower.patch_embedder(pixels[None], positions[None], torch.zeros(1, len(pixels), dtype=torch.bool))

    def layer(module: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        def run(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return module(states, position_embeddings=tower.encoder.rotary_emb(states, positions[None]),
                          attention_mask=None, position_ids=positions[None])
        return run

    def head(hidden: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        padding = ~real_patches(position_ids)
        pooled, filled = tower.pooler(hidden, position_ids, padding, hidden.shape[1] // tower.config.pooling_kernel_size ** 2)
        if tower.config.standardize:
            pooled = (pooled - tower.std_bias.float()) * tower.std_scale.float()
        features = side.embed_vision(pooled.to(hidden.dtype))
        return torch.where(filled.unsqueeze(-1), features, torch.zeros_like(features))

    return PaddedParts(embed, [layer(module) for module in tower.encoder.layers], head)


GEMMA4 = ModelDescription(
    architecture="gemma4",
    model_types=("gemma4",),
    weight_prefixes=("", {"model.vision_tower.": "vision_tower.", "model.embed_vision.": "embed_vision."}),
    block_path=r"vision_tower\.encoder\.layers\.(\d+)$",
    build=build,
    exportable=ExportableGemma4,
    attention_context=attention.padded,
    image_processor=image_processor,
    query_projection=(r"self_attn\.q_proj\.linear$", 0, 1),
    tower_shape=tower_shape,
    padded=PaddedPatches(grid_multiple=lambda config: config.vision_config.pooling_kernel_size,
                         position_table=lambda config: config.vision_config.position_embedding_size,
                         parts=reference_parts),
    whole_config=True,
)
