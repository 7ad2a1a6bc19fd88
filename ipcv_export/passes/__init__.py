"""IPCV as graph passes over a captured encoder, in the order they run.

Each pass edits the unlifted module of an ExportedProgram; `compress` then re-exports it with the
same dynamic shapes, so the exporter (not hand code) recomputes every fake value, the graph
signature and the range constraints, and traces the token functions the passes inserted.
"""

from __future__ import annotations

from torch import fx

from ..config import IpcvConfig, UsageError
from ..models.description import ModelDescription
from . import _graph
from .annotate_blocks import AnnotateBlocksPass
from .prune_tokens import PruneTokensPass
from .reconstruct_tokens import ReconstructTokensPass
from .reintegrate_tokens import ReintegrateTokensPass
from .remove_noop_casts import RemoveNoOpCastsPass
from .stabilize_attention import StabilizeAttentionPass

__all__ = ["check_supported", "ipcv_passes", "run_passes", "RemoveNoOpCastsPass"]


EXPOSED = ("keep", "neighbors")
"""Roles that `strategies.pruning.expose_selection` turns into outputs after the passes: kept even when no
pass reads them (merging at Delta = 0 reads neither)."""


def check_supported(config: IpcvConfig, description: ModelDescription) -> None:
    """UsageError unless the passes can apply `config` to this family: every selection but score
    reads the image grid or merges within each image, which only towers that batch whole images have."""
    if config.selection != "score" and description.image_batch is None:
        raise UsageError(f"{config.selection} selection is implemented for towers that batch whole images so far, "
                         f"not for {'padded' if description.padded else 'packed'} towers")
    if config.per_image_selection and (description.image_batch or description.padded):
        raise UsageError("per-image selection applies to packed towers; towers that batch whole images, padded or "
                         "not, always select within each image")


def ipcv_passes(config: IpcvConfig, description: ModelDescription, depth: int, patch_size: int | None = None,
                taps: tuple[int, ...] = ()) -> list:
    """The ordered pass list for one configuration of an encoder family: ipcv.md's steps.
    `patch_size` is needed for every selection but score (towers that batch whole images); `taps`
    are the blocks whose outputs also leave the tower (LoadedEncoder.tap_blocks)."""
    check_supported(config, description)
    batch = description.image_batch
    if config.selection != "score" and patch_size is None:
        raise ValueError(f"{config.selection} selection needs the tower's patch size")
    search = [] if config.selection == "merge" else [  # merging names each removed token's owner itself
        ReconstructTokensPass(config.neighbors, bool(batch and batch.neighbors_across_images),
                              config.ngr_weighting == "similarity")]
    return [
        AnnotateBlocksPass(description.block_path, depth),
        PruneTokensPass(config.retention_e4, config.prune_layer, depth, batch.special_tokens if batch else 0,
                        config.selection, patch_size, config.per_image_selection and batch is None),
        *search,
        StabilizeAttentionPass(config.prune_layer, config.as_depth, depth, description.query_projection),
        ReintegrateTokensPass(depth, tuple(j for j in taps if j >= config.prune_layer)),
    ]


def run_passes(gm: fx.GraphModule, passes: list) -> fx.GraphModule:
    """Run each pass (requires, call, ensures), naming the failing pass and the ones before it."""
    for position, pass_ in enumerate(passes):
        try:
            gm = pass_(gm).graph_module
        except Exception as err:
            before = ", ".join(type(p).__name__ for p in passes[:position]) or "none"
            raise RuntimeError(f"{type(pass_).__name__} failed (after: {before}): {err}") from err
    gm.graph.eliminate_dead_code(is_impure_node=lambda node: node.is_impure() or node.meta.get(_graph.ROLE) in EXPOSED)
    gm.recompile()
    return gm
