"""The exportable module of every tower that batches whole images, built from its stock parts.

The captured graph and the eager reference (`reference.batched_reference`) run the same
`TowerParts`: embed, the blocks one after the other, then the head. The family's module is held
as a submodule, so module paths in the graph (which the passes match) are the family's own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .description import TowerParts


class ExportableImageBatch(torch.nn.Module):
    """pixel_values [B, C, H, W] -> what follows the tower (final-norm tokens, projected features)."""

    def __init__(self, model: torch.nn.Module, parts: Callable[[torch.nn.Module], TowerParts]) -> None:
        super().__init__()
        self.model = model
        self.parts = parts(model)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.parts.embed(pixel_values)
        for block in self.parts.blocks:
            hidden = block(hidden)
        return self.parts.head(hidden, pixel_values.shape[3] // self.parts.patch_size)
