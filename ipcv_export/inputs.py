"""The processor's `grid_thw` -> each patch's (row, column) position and segment id.

grid_thw rows are (t, h, w) in patches. Tokens come in the processor's order: slice by slice, and
within a slice in merge x merge blocks (block-major), which is what the merger's `view` expects.
The host functions (`position_ids`, `segment_ids`) are the readable definition the reference
uses; `ipcv::grid_layout` computes the same inside an exported file, so that a file takes what the
processor gives (pixel_values, image_grid_thw) and nothing else.
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


def host_layout(grid_thw: torch.Tensor, merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids, segment_ids) of a checked grid: what `grid_layout` must equal."""
    grid = check_grid(grid_thw, merge_size)
    return position_ids(grid, merge_size), segment_ids(grid)


@torch.library.custom_op("ipcv::grid_layout", mutates_args=())
def grid_layout(grid_thw: torch.Tensor, pixel_values: torch.Tensor,
                merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(position_ids [N, 2], segment_ids [N]) of the N = pixel_values rows that `grid_thw` describes,
    as `host_layout`. One graph node, so that passes find the segment ids (`_graph.segment_input`);
    lowering replaces it by `decomposed_grid_layout`."""
    return decomposed_grid_layout(grid_thw, pixel_values, merge_size)


@grid_layout.register_fake
def _grid_layout_fake(grid_thw, pixel_values, merge_size):
    n = pixel_values.shape[0]
    return grid_thw.new_empty(n, 2), grid_thw.new_empty(n)


def decomposed_grid_layout(grid_thw: torch.Tensor, pixel_values: torch.Tensor,
                           merge_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The decomposition, element-wise over the N tokens with [N, images] comparisons: static shapes
    (N from pixel_values, the images from grid_thw), integer Div on non-negative values (truncation
    is floor division; TensorRT rejects the sign test of floor division), running sums in fp32
    (TensorRT's CumSum takes floats; exact below 2^24 patches)."""
    grid = grid_thw.to(torch.int64)
    slices, rows, cols = grid.unbind(1)
    area = rows * cols
    token, image, image_end = _token_images(grid, pixel_values)
    local = token - (image_end - slices * area).index_select(0, image)
    token_area = area.index_select(0, image)
    slice_index = div(local, token_area)
    segments = (running_sum(slices) - slices).index_select(0, image) + slice_index
    in_slice = local - slice_index * token_area
    group = merge_size * merge_size
    block = div(in_slice, group)
    in_block = in_slice - block * group
    blocks_per_row = div(cols.index_select(0, image), merge_size)
    block_row = div(block, blocks_per_row)
    block_col = block - block_row * blocks_per_row
    in_row = div(in_block, merge_size)
    positions = torch.stack([block_row * merge_size + in_row,
                             block_col * merge_size + in_block - in_row * merge_size], -1)
    return positions, segments


def patch_grid_sides(grid_thw: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """[N, 2] (h, w) of the grid each of the N = pixel_values rows belongs to, in graph-safe
    operations as `decomposed_grid_layout` (towers that resample a position table per image)."""
    grid = grid_thw.to(torch.int64)
    _, image, _ = _token_images(grid, pixel_values)
    return grid[:, 1:].index_select(0, image)


def _token_images(grid: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token [N] 0..N-1, the grid row each token belongs to [N], each row's end in tokens [S]),
    by [N, S] comparisons (static shapes)."""
    slices, rows, cols = grid.unbind(1)
    image_end = running_sum(slices * rows * cols)
    token = torch.arange(pixel_values.shape[0], device=grid.device)
    image = (token[:, None] >= image_end[None, :]).to(torch.int64).sum(1)
    image = torch.minimum(image, torch.full_like(image, grid.shape[0] - 1))  # rows beyond the grid: not valid input
    return token, image, image_end


def div(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """Integer division of non-negative values (truncation: TensorRT rejects floor's sign test)."""
    return torch.div(a, b, rounding_mode="trunc")


def running_sum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum of integers in fp32 (TensorRT's CumSum takes floats; exact below 2^24)."""
    return torch.cumsum(x.to(torch.float32), 0).to(torch.int64)


def square_grid(tokens: int, multiple: int = 1) -> tuple[int, int]:
    """The most nearly square rows x columns patch grid with rows * columns = tokens, both
    multiples of `multiple` (a packed tower's merge size): the image benchmarks and FLOP counts use."""
    for rows in range(math.isqrt(tokens), 0, -1):
        if tokens % rows == 0 and rows % multiple == 0 and (tokens // rows) % multiple == 0:
            return rows, tokens // rows
    raise ValueError(f"{tokens} patches cannot form an image with sides that are multiples of {multiple}")


def real_patches(position_ids: torch.Tensor) -> torch.Tensor:
    """[..., P] bool of a padded tower's [..., P, 2] patch positions: False where both coordinates
    are -1 (padding, as the stock Gemma 4 tower reads it). Host code's definition (input checks,
    the reference); the graph computes `valid_tokens`, which agrees on every input the checks accept."""
    return (position_ids != -1).any(-1)


@torch.library.custom_op("ipcv::valid_tokens", mutates_args=())
def valid_tokens(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, P] int64, 1 for a real patch and 0 for padding, of a padded tower's [B, P, 2] patch
    positions (a processor that pads every image to P patches marks padding with -1 on both axes).
    One graph node, so that passes find which tokens are padding (`_graph.valid_input`); lowering
    replaces it by `decomposed_valid_tokens`."""
    return decomposed_valid_tokens(position_ids)


@valid_tokens.register_fake
def _valid_tokens_fake(position_ids):
    return position_ids.new_empty(position_ids.shape[:-1], dtype=torch.int64)


def decomposed_valid_tokens(position_ids: torch.Tensor) -> torch.Tensor:
    """A patch is padding when every coordinate is negative (the processor writes -1, -1): one
    ReduceMax and a comparison, cast to integers (TensorRT refuses reductions over booleans)."""
    return (position_ids.amax(-1) >= 0).to(torch.int64)
