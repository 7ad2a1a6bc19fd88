"""Learned absolute position tables resized to any grid: the one step that lets a fixed-size ViT
(CLIP, SigLIP, DINOv2) be captured with symbolic image height and width.

The stock embeddings skip the resize at the native square size, a branch a graph with symbolic
H and W cannot take; here the table is always resized. At the native size that reproduces it
exactly: bicubic weights at integer offsets are 1, 0, 0, 0.
"""

from __future__ import annotations

import torch


def resized_positions(table: torch.Tensor, special_tokens: int, rows: int | torch.SymInt,
                      cols: int | torch.SymInt) -> torch.Tensor:
    """[1, S + G*G, D] table (S special-token entries first, then a G x G grid) ->
    [1, S + rows*cols, D], the grid resized bicubically in fp32 (align_corners=False)."""
    side = round((table.shape[1] - special_tokens) ** 0.5)
    grid = table[:, special_tokens:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = torch.nn.functional.interpolate(grid.float(), size=(rows, cols), mode="bicubic",
                                              align_corners=False).to(table.dtype)
    return torch.cat([table[:, :special_tokens], resized.flatten(2).transpose(1, 2)], 1)
