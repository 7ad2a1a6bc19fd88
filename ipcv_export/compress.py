"""compress: an ExportedProgram of the stock encoder -> the ExportedProgram running IPCV."""

from __future__ import annotations

import operator

import torch

from . import tokens
from .capture import export_symbolic
from .config import IpcvConfig
from .layouts import layout_of
from .mixed_resolution import ExportableMixedResolution, min_grid_side
from .models import attention
from .models.encoder import LoadedEncoder
from .passes import RemoveNoOpCastsPass, _graph, ipcv_passes, run_passes


def expose_selection(gm: torch.fx.GraphModule, neighbors: int, special_tokens: int = 0,
                     patch_size: int | None = None) -> None:
    """Add the kept indices [K] and neighbour indices [R, k] as outputs after the features.

    They let a runtime or the parity gate see which patches were computed in full and what each
    removed patch was rebuilt from; a runtime that only wants embeddings ignores them. Batched
    towers give them per image ([B, K], [B, R, k]).
    """
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    features = tuple(output.args[0])
    if _graph.with_role(graph, "keep"):
        selection = (_graph.one_with_role(graph, "keep"), _graph.one_with_role(graph, "neighbors"))
    else:
        both = _graph.insert(graph, tokens.no_selection, (_graph.pixel_input(graph), neighbors, special_tokens, patch_size),
                             pass_name="compress", before=output)
        selection = tuple(_graph.insert(graph, operator.getitem, (both, i), pass_name="compress", before=output)
                          for i in range(2))
    output.args = ((*features, *selection),)
    codegen = gm.graph._codegen
    leaves = (0,) * (len(features) + len(selection))
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=torch.utils._pytree.tree_structure(leaves))
    gm.recompile()


def min_patches(config: IpcvConfig) -> int:
    """The fewest patches (per call; per image of a tower that batches them) a file for `config`
    takes: where IPCV keeps at least one token (`tokens.min_tokens`), or where mixed selection has
    at least one fine cell (a square grid of `mixed_resolution.min_grid_side`)."""
    if config.selection == "mixed":
        return min_grid_side(config.retention_e4, config.mixed_cell) ** 2
    return tokens.min_tokens(config.retention_e4)


def compress(program: torch.export.ExportedProgram, encoder: LoadedEncoder,
             config: IpcvConfig) -> torch.export.ExportedProgram:
    """Run the IPCV passes on the captured program and re-export it with N still dynamic.

    The file accepts N >= min_patches(config), where K >= 1 (see `tokens.kept_count`). rho = 1 runs
    no pass at all: nothing is pruned, so the program is the original one. Mixed selection runs no
    pass either: its tokens change before the first block, so the tower is captured again from its
    stock parts with them (`mixed_resolution.ExportableMixedResolution`).
    """
    config.check(encoder.depth)
    smallest, layout = min_patches(config), layout_of(encoder)
    if config.selection == "mixed":
        batch = encoder.description.image_batch
        module = ExportableMixedResolution(encoder.module, batch.parts, batch.special_tokens, config.retention_e4,
                                           config.mixed_cell).eval()
        with attention.batched_whole_queries(encoder.module):
            return export_symbolic(module, layout.example_inputs(encoder, smallest), layout.dynamic_shapes(encoder, smallest))
    gm = program.module()
    if config.retention_e4 < tokens.RETENTION_SCALE:
        passes = ipcv_passes(config, encoder.description, encoder.depth, encoder.patch_size, encoder.tap_blocks)
        gm = run_passes(gm, [RemoveNoOpCastsPass(), *passes])
    batched = encoder.description.image_batch is not None
    expose_selection(gm, config.neighbors, encoder.special_tokens, encoder.patch_size if batched else None)
    return export_symbolic(gm, layout.example_inputs(encoder, smallest), layout.dynamic_shapes(encoder, smallest))
