"""Host-side inputs: `grid_thw` -> the engine's position_ids and segment_ids.

grid_thw rows are (t, h, w) in patches. Tokens come in the processor's order: slice by slice, and
within a slice in merge x merge blocks (block-major), which is what the merger's `view` expects.
"""

from __future__ import annotations

import math

import torch


def check_grid(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """grid_thw as an int64 [S, 3] tensor, or ValueError naming the problem."""
    grid = torch.as_tensor(grid_thw)
    if grid.ndim != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"grid_thw must have shape [images, 3], got {list(grid.shape)}")
    if grid.is_floating_point() or (grid <= 0).any():
        raise ValueError("grid_thw must hold positive integers (t, h, w)")
    bad = (grid[:, 1:] % merge_size != 0).any(-1)
    if bad.any():
        raise ValueError(f"grid_thw row {int(bad.nonzero()[0])} ({grid[bad][0].tolist()}): "
                         f"h and w must be multiples of the merge size {merge_size}")
    return grid.to(torch.int64)


def position_ids(grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    """[N, 2] (row, column) of every patch, in token order."""
    rows = []
    for t, h, w in grid_thw.tolist():
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        blocks = (h // merge_size, merge_size, w // merge_size, merge_size)
        rc = torch.stack([r.reshape(blocks).transpose(1, 2).flatten(), c.reshape(blocks).transpose(1, 2).flatten()], -1)
        rows.append(rc.repeat(t, 1))
    return torch.cat(rows)


def segment_ids(grid_thw: torch.Tensor) -> torch.Tensor:
    """[N] index of the image or temporal slice each patch belongs to."""
    sizes = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0])
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)


def slice_lengths(grid_thw: torch.Tensor) -> list[int]:
    """Tokens of every image or temporal slice (the segments), in order."""
    return [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]


def engine_inputs(grid_thw: torch.Tensor, merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    grid = check_grid(grid_thw, merge_size)
    return position_ids(grid, merge_size), segment_ids(grid)



def square_grid(tokens: int, multiple: int = 1) -> tuple[int, int]:
    """The most nearly square rows x columns patch grid with rows * columns = tokens, both
    multiples of `multiple` (a packed tower's merge size): the image benchmarks and FLOP counts use."""
    for rows in range(math.isqrt(tokens), 0, -1):
        if tokens % rows == 0 and rows % multiple == 0 and (tokens // rows) % multiple == 0:
            return rows, tokens // rows
    raise ValueError(f"{tokens} patches cannot form an image with sides that are multiples of {multiple}")
