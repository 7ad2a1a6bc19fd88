"""Learned absolute position tables resized to any grid: the one step that lets a fixed-size ViT
(CLIP, SigLIP, DINOv2) be captured with symbolic image height and width.

The stock embeddings skip the resize at the native square size, a branch a graph with symbolic
H and W cannot take; here the table is always resized. At the native size that reproduces it
exactly: bicubic weights at integer offsets are 1, 0, 0, 0.

The resize is written as four-tap gathers and weighted sums (`bicubic_resize`), not as
`interpolate`: ONNX Runtime's cubic Resize of DINOv2-S's [384, 37, 37] table took 56 of 438 ms
of node time at 448 px on two CPU cores (BENCHMARKS.md).
"""

from __future__ import annotations

import torch

CUBIC_A = -0.75
"""The cubic convolution constant of torch's (and ONNX's default) bicubic resampling."""


def resized_positions(table: torch.Tensor, special_tokens: int, rows: int | torch.SymInt,
                      cols: int | torch.SymInt) -> torch.Tensor:
    """[1, S + G*G, D] table (S special-token entries first, then a G x G grid) ->
    [1, S + rows*cols, D], the grid resized bicubically in fp32 (align_corners=False)."""
    side = round((table.shape[1] - special_tokens) ** 0.5)
    grid = table[:, special_tokens:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = bicubic_resize(grid.float(), rows, cols).to(table.dtype)
    return torch.cat([table[:, :special_tokens], resized.flatten(2).transpose(1, 2)], 1)


def bicubic_resize(grid: torch.Tensor, rows: int | torch.SymInt, cols: int | torch.SymInt) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, rows, cols]: torch's bicubic `interpolate` (align_corners=False, no
    antialiasing, edge samples repeated), one axis at a time, equal to it up to fp32 rounding."""
    return _resize_axis(_resize_axis(grid, 2, rows), 3, cols)


def _resize_axis(grid: torch.Tensor, axis: int, resized: int | torch.SymInt) -> torch.Tensor:
    """`grid` with its `axis` (counted from the front) resized to `resized` samples."""
    taps, weights = _cubic_taps(grid.shape[axis], resized, grid.device)
    picked = grid.index_select(axis, taps.flatten()).unflatten(axis, (-1, 4))
    trailing = picked.dim() - axis - 2  # axes after the taps' one, which the weights broadcast over
    return (picked * weights.reshape(*weights.shape, *[1] * trailing)).sum(axis + 1)


def _cubic_taps(size: int, resized: int | torch.SymInt, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """[resized, 4] source indices (clamped to the edge) and their cubic weights, for each output
    sample at half-pixel centres: source = (out + 0.5) * size / resized - 0.5."""
    source = (torch.arange(resized, device=device, dtype=torch.float32) + 0.5) * (size / resized) - 0.5
    start = source.floor()
    t = (source - start)[:, None]
    offsets = torch.arange(-1, 3, device=device, dtype=torch.float32)
    taps = (start[:, None] + offsets).clamp(0, size - 1).long()  # clamped as floats: TensorRT clips no INT64
    distance = (t - offsets).abs()
    a = CUBIC_A
    near = ((a + 2) * distance - (a + 3)) * distance * distance + 1
    far = ((a * distance - 5 * a) * distance + 8 * a) * distance - 4 * a
    return taps, torch.where(distance <= 1, near, far)
