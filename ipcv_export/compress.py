"""compress: an ExportedProgram of the stock encoder -> the ExportedProgram running IPCV."""

from __future__ import annotations

import operator

import torch

from . import tokens
from .capture import dynamic_shapes, example_inputs, export_symbolic
from .config import IpcvConfig
from .models import LoadedEncoder
from .passes import RemoveNoOpCastsPass, ipcv_passes, run_passes
from .passes import _graph

OUTPUT_NAMES = ["image_features", "kept_index", "neighbor_index"]
"""The program's outputs. `image_features` is the name ONNX Runtime GenAI reads; the other two are
diagnostics (the parity gate reads them; `.onnx` files keep them only when asked)."""


def expose_selection(gm: torch.fx.GraphModule, neighbors: int, special_tokens: int = 0,
                     patch_size: int | None = None) -> None:
    """Add the kept indices [K] and neighbour indices [R, k] as outputs after the embeddings.

    They let a runtime or the parity gate see which patches were computed in full and what each
    removed patch was rebuilt from; a runtime that only wants embeddings ignores them. Batched
    towers give them per image ([B, K], [B, R, k]).
    """
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    (embeddings,) = output.args[0]
    if _graph.with_role(graph, "keep"):
        selection = (_graph.one_with_role(graph, "keep"), _graph.one_with_role(graph, "neighbors"))
    else:
        both = _graph.insert(graph, tokens.no_selection, (_graph.pixel_input(graph), neighbors, special_tokens, patch_size),
                             pass_name="compress", before=output)
        selection = tuple(_graph.insert(graph, operator.getitem, (both, i), pass_name="compress", before=output)
                          for i in range(2))
    output.args = ((embeddings, *selection),)
    codegen = gm.graph._codegen
    codegen.pytree_info = codegen.pytree_info._replace(out_spec=torch.utils._pytree.tree_structure((0, 0, 0)))
    gm.recompile()


def compress(program: torch.export.ExportedProgram, encoder: LoadedEncoder,
             config: IpcvConfig) -> torch.export.ExportedProgram:
    """Run the IPCV passes on the captured program and re-export it with N still dynamic.

    The file accepts N >= min_tokens(rho), where K >= 1 (see `tokens.kept_count`). rho = 1 runs
    no pass at all: nothing is pruned, so the program is the original one.
    """
    config.check(encoder.depth)
    gm = program.module()
    if config.retention_e4 < tokens.RETENTION_SCALE:
        passes = ipcv_passes(config, encoder.description, encoder.depth, encoder.patch_size)
        gm = run_passes(gm, [RemoveNoOpCastsPass(), *passes])
    batched = encoder.description.image_batch is not None
    expose_selection(gm, config.neighbors, encoder.special_tokens, encoder.patch_size if batched else None)
    shapes = dynamic_shapes(encoder, config.retention_e4)
    return export_symbolic(gm, example_inputs(encoder), shapes)
