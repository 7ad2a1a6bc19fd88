"""The declarative description of an encoder family: everything passes must not hard-code."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..ops import QUERY_CHUNKS
from ..inputs import square_grid
from .cost import TowerShape, ipcv_call_flops, ipcv_flops, mixed_flops


def square_side(size: int | Sequence[int]) -> int:
    """A config's square size (image or patch side), given as an int or as [height, width]
    (InternViT's configs)."""
    return size if isinstance(size, int) else size[0]


def sdpa_builder(config_class: type, module_class: type) -> Callable[[dict], torch.nn.Module]:
    """A family's `build` whose stock module is `module_class(config_class(**vision_config))`: with
    SDPA attention (what the capture switches away from and back to) and in eval mode."""
    def build(vision_config: dict) -> torch.nn.Module:
        config = config_class(**vision_config)
        config._attn_implementation = "sdpa"
        return module_class(config).eval()

    return build


class BlockAttention(NamedTuple):
    """Which keys a block's queries see: those of the same segment id. `span`: every segment is one
    contiguous run of at most this many tokens (a windowed tower's windows, in window-major token
    order), so attention can be banded; None: segments of any length (images, temporal slices).
    `query_chunks`: dense attention (no span) computes its queries in this many slices; a tower
    with few dense blocks affords more than the default, which bounds its memory at large N for
    little export time."""

    segments: torch.Tensor
    span: int | None = None
    query_chunks: int = QUERY_CHUNKS


@dataclass(frozen=True)
class TowerParts:
    """A batched tower's stock parts, for the eager reference: embed(pixels) -> [B, T, D] tokens,
    the blocks ([B, T, D] -> [B, T, D]), the head that follows them (norm, projector; it gets the
    tokens and the grid's patches per row, which a pixel shuffle needs), and the patch size
    (pixels per grid cell)."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    blocks: list[Callable[[torch.Tensor], torch.Tensor]]
    head: Callable[[torch.Tensor, int], torch.Tensor]
    patch_size: int


@dataclass(frozen=True)
class PaddedParts:
    """A padded tower's stock parts, for the eager reference, on one image's V real patches:
    embed(pixels [V, w], positions [V, 2]) -> [1, V, D]; the blocks ((states [1, M, D], their
    positions [M, 2]) -> [1, M, D]); the head that follows them (padded last-block states
    [B, P, D] and image_position_ids [B, P, 2] -> the features [B, P / k^2, hidden], zero rows
    after each image's own)."""

    embed: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    blocks: list[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
    head: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ImageBatch:
    """Marks a tower that takes a batch of whole images [B, C, H, W] (CLIP, SigLIP, InternViT,
    DINOv2; ipcv.md, towers with a CLS token): positions are added at the embedding, attention
    stays within each image, and selection keeps the same count in every image.

    special_tokens: tokens before the patches (CLS, registers) that are always kept, never scored.
    parts: stock module -> TowerParts.
    grid_multiple: each side of an image's patch grid must be a multiple of this (a head that folds
        2 x 2 patches into one token needs 2).
    neighbors_across_images: NGR searches a removed token's neighbours among the kept tokens of
        every image of the call, not only its own (ipcv.md; InternViT's authors do).
    """

    special_tokens: int
    parts: Callable[[torch.nn.Module], TowerParts]
    grid_multiple: int = 1
    neighbors_across_images: bool = False


@dataclass(frozen=True)
class PaddedPatches:
    """Marks a tower whose processor pads every image's patch rows to one length P (Gemma 4):
    inputs pixel_values [B, P, w] and image_position_ids [B, P, 2] (x, y), -1 on both axes for
    padding. IPCV applies per image to its real patches (`inputs.valid_tokens`): K counts them,
    padding is never chosen over a real patch nor used as a neighbour.

    grid_multiple: config -> each side of an image's patch grid is a multiple of it (a pooler
        that averages k x k cells needs k), and P a multiple of its square.
    position_table: config -> rows per axis of the learned position table: coordinates must be below it.
    parts: stock module -> PaddedParts.
    """

    grid_multiple: Callable[[Any], int]
    position_table: Callable[[Any], int]
    parts: Callable[[torch.nn.Module], PaddedParts]


@dataclass(frozen=True)
class ModelDescription:
    """What the pipeline needs to know about one encoder family.

    architecture: the name used in manifests and error messages.
    model_types: `model_type` values of checkpoint config.json files this family loads.
    weight_prefixes: where the module's tensors are in full-model checkpoints, alternatives tried in
        order: a key prefix to strip, or {checkpoint prefix: module prefix} for modules stored under
        several names (a LLaVA tower and its projector). Other keys (the LLM) are never read.
    block_path: regex matched against module paths in `nn_module_stack`; group 1 is the block index.
    build: vision-config dict -> the stock module with freshly initialised weights.
    exportable: stock module -> module with the engine's signature (tensors in, embeddings out).
    attention_context: stock module -> context manager that routes attention through `ipcv::segment_attention`.
    query_projection: (path regex, part, parts) of the linear layer whose output holds the attention
        queries as part `part` of `parts` equal column slices (Qwen2-VL's fused qkv: 0 of 3), or
        None; attention-stabilised blocks then compute queries for kept rows only.
    tower_shape: vision config -> the sizes of ipcv.md's cost model (cost.TowerShape), which
        `flop_floor` and `call_flop_floor` price: the figures the counted graph is held against.
    stock_flops: (vision config, grid_thw) -> FLOPs of the stock module on that call, with its own
        kernels' attention (per window, per segment): what users run today, for the benchmarks.
    block_segments: (vision config, position_ids, segment_ids) -> one BlockAttention per block
        (attention stays within a segment); None: every block attends within each image.
        Windowed towers give window ids in their window blocks.
    token_order: (vision config, position_ids, segment_ids) -> [N] place of each processor-order
        token in the order the tower runs its blocks (window-major for a windowed tower, so that
        windows are contiguous runs), or None for the processor's order. The exportable module and
        the reference both apply it; kept indices and neighbours refer to that order.
    embed: (stock module, pixel_values, grid_thw) -> the reference's [N, D] token states before
        block 0, for a packed tower that adds more than its patch embedding (a learned position
        table resampled to each grid); None: the module's patch_embed.
    run_block: (block, tokens, cos, sin, segment ids) -> the block's own forward, for the reference
        of a packed tower (attention within each segment).
    run_stabilized_block: (block, all N states z, kept states y, keep, cos, sin, segment ids) -> the
        block as an AS block (keys and values from z, queries for the kept rows), for that reference.
    taps: stock module -> (block index, merger) of each block whose output also leaves the tower
        through its own merger (Qwen3-VL's DeepStack), in the stock order of its outputs; None: none.
    image_processor: vision config -> {"class": transformers image processor class, "kwargs": its
        settings}; a checkpoint's preprocessor_config.json overrides the kwargs it names.
    image_batch: None for packed towers (Qwen-style: [N, D] patches of several images with
        positions and segment ids); else how the tower batches whole images.
    padded: set for a tower whose images come as equally long, padded patch sequences.
    whole_config: `build` takes the whole config.json, not its vision_config (a projector needs
        the LLM's width; LLaVA's feature layer is a top-level setting).
    method_defaults: IpcvConfig fields whose default differs for this family (InternViT's authors
        prune at l_p = 7 with Delta = 3); the user's values win.
    """

    architecture: str
    model_types: tuple[str, ...]
    weight_prefixes: tuple[str | dict[str, str], ...]
    block_path: str
    build: Callable[[dict], torch.nn.Module]
    exportable: Callable[[torch.nn.Module], torch.nn.Module]
    attention_context: Callable[[torch.nn.Module], Any]
    image_processor: Callable[[Any], dict]
    query_projection: tuple[str, int, int] | None = None
    tower_shape: Callable[[Any], TowerShape] | None = None
    stock_flops: Callable[[Any, torch.Tensor], int] | None = None
    block_segments: Callable[[Any, torch.Tensor, torch.Tensor], list[BlockAttention]] | None = None
    token_order: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    embed: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    taps: Callable[[torch.nn.Module], list[tuple[int, torch.nn.Module]]] | None = None
    run_block: Callable[..., torch.Tensor] | None = None
    run_stabilized_block: Callable[..., torch.Tensor] | None = None
    image_batch: ImageBatch | None = None
    padded: PaddedPatches | None = None
    whole_config: bool = False
    method_defaults: dict[str, int] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        """The name of the family's input layout (layouts/): set by `image_batch` or `padded`."""
        return "images" if self.image_batch else "padded" if self.padded else "packed"

    def flop_floor(self, config: Any, retention_e4: int, prune_layer: int, as_depth: int, tokens: int,
                   selection: str = "score", mixed_cell: int = 2) -> int:
        """ipcv.md's cost model for one image (segment) of `tokens` patches (`cost.ipcv_flops`); mixed
        selection's (`cost.mixed_flops`, cells of `mixed_cell` patches a side) on the most nearly
        square grid of them, as FLOPs are counted."""
        if selection == "mixed":
            rows, columns = square_grid(tokens, self.image_batch.grid_multiple)
            return mixed_flops(self.tower_shape(config), retention_e4, rows, columns, mixed_cell)
        return ipcv_flops(self.tower_shape(config), retention_e4, prune_layer, as_depth, tokens, selection)

    def call_flop_floor(self, config: Any, retention_e4: int, prune_layer: int, as_depth: int,
                        segments: Sequence[tuple[int, int]], selection: str = "score") -> int:
        """The cost model for one call of several segments, each (patches, kept patches), attention
        priced segment by segment (`cost.ipcv_call_flops`)."""
        return ipcv_call_flops(self.tower_shape(config), retention_e4, prune_layer, as_depth, segments, selection)
