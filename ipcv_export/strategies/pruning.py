"""IPCV inside the tower (ipcv.md): the passes prune tokens before block l_p, rebuild them by NGR,
stabilise attention for Delta blocks and reintegrate them; every selection but `mixed`."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .. import tokens
from ..capture import export_symbolic
from ..passes import RemoveNoOpCastsPass, _graph, ipcv_passes, run_passes
from .base import Strategy

if TYPE_CHECKING:
    from ..config import IpcvConfig
    from ..models.encoder import LoadedEncoder


class Pruning(Strategy):
    def min_patches(self, config: IpcvConfig) -> int:
        """Where IPCV keeps at least one token (`tokens.min_tokens`)."""
        return tokens.min_tokens(config.retention_e4)

    def compress(self, program: torch.export.ExportedProgram, encoder: LoadedEncoder,
                 config: IpcvConfig) -> torch.export.ExportedProgram:
        """Run the IPCV passes on the captured program and re-export it. The file accepts N >=
        min_patches(config), where K >= 1 (see `tokens.kept_count`). rho = 1 runs no pass at all:
        nothing is pruned, so the program is the original one."""
        gm = program.module()
        if config.retention_e4 < tokens.RETENTION_SCALE:
            passes = ipcv_passes(config, encoder.description, encoder.depth, encoder.patch_size, encoder.tap_blocks)
            gm = run_passes(gm, [RemoveNoOpCastsPass(), *passes])
        batched = encoder.description.layout == "images"
        expose_selection(gm, config.neighbors, encoder.special_tokens, encoder.patch_size if batched else None)
        return export_symbolic(gm, encoder, self.min_patches(config))

    def describe(self, config: IpcvConfig) -> str:
        return (f"rho={config.retention}, l_p={config.prune_layer}, Delta={config.as_depth}, k={config.neighbors}, "
                f"selection={config.selection}, NGR weighting={config.ngr_weighting}, "
                f"per-image selection={config.per_image_selection}")

    def as_run(self, config: IpcvConfig, depth: int, report: Callable[[str], None]) -> IpcvConfig:
        """An AS depth reaching past the last block is cut to the blocks there are (said in one line)."""
        stabilised = depth - config.prune_layer
        if config.as_depth > stabilised:
            report(f"  AS depth {config.as_depth} reaches past the last block: the {stabilised} blocks after l_p="
                   f"{config.prune_layer} are stabilised (recorded as {stabilised})")
            config = dataclasses.replace(config, as_depth=stabilised)
        return config


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


PRUNING = Pruning()
