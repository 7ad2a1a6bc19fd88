"""compress: an ExportedProgram of the stock encoder -> the ExportedProgram the file runs, by the
configuration's strategy (strategies/: IPCV's pruning, or mixed-resolution tokens)."""

from __future__ import annotations

import torch

from .config import IpcvConfig
from .models.encoder import LoadedEncoder
from .strategies import strategy_of


def min_patches(config: IpcvConfig) -> int:
    """The fewest patches (per call; per image of a tower that batches them) a file for `config`
    takes (its strategy's `min_patches`)."""
    return strategy_of(config).min_patches(config)


def compress(program: torch.export.ExportedProgram, encoder: LoadedEncoder,
             config: IpcvConfig) -> torch.export.ExportedProgram:
    """The captured stock program -> the program running `config`, N still dynamic, with its kept
    and neighbour indices as its last two outputs (Strategy.compress)."""
    config.check(encoder.depth)
    return strategy_of(config).compress(program, encoder, config)
