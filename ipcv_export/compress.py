"""compress: an ExportedProgram of the stock encoder -> the ExportedProgram running IPCV."""

from __future__ import annotations

import torch

from . import tokens
from .capture import dynamic_shapes, example_inputs, export_symbolic
from .config import IpcvConfig
from .models import LoadedEncoder
from .passes import ipcv_passes, run_passes


def compress(program: torch.export.ExportedProgram, encoder: LoadedEncoder,
             config: IpcvConfig) -> torch.export.ExportedProgram:
    """Run the IPCV passes on the captured program and re-export it with N still dynamic.

    The file accepts N >= min_tokens(rho), where K >= 1 (see `tokens.kept_count`).
    """
    config.check(encoder.depth)
    gm = program.module()
    gm = run_passes(gm, ipcv_passes(config, encoder.description.block_path, encoder.depth))
    shapes = dynamic_shapes(encoder, tokens.min_tokens(config.retention_e4))
    return export_symbolic(gm, example_inputs(encoder), shapes)
