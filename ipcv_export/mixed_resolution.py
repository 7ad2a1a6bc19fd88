"""Mixed-resolution tokens (`--selection mixed`; FIDELITY.md, issue 23), in graph-safe form.

Every c x c cell of an image's patch grid (c = 2 by default, `--mixed-cell`) enters the blocks
either as its c^2 patch tokens (the cells whose tokens differ most from their mean: detail) or as
(c - 1)^2 tokens: the tower's own embedding of the image shrunk by (c - 1) / c (area weights
within each block of c pixels; c = 2 is 2 x 2 pixel means), at the shrunk grid's positions. A
trained tower sees real image content at every token, at two scales, which keeps it in its
training distribution (pooling or pruning hidden states does not: FIDELITY.md). After the
blocks, the coarse grid (a fine cell standing for its outputs shrunk the same way) is resized
bilinearly back to the full grid for the coarse cells' patches, and the full grid goes to the
tower's head. Patches outside every cell (the last rows and columns of a side not divisible by
c) stay fine.

`reference.mixed_reference` is the plain version the files are checked against. Here the sizes
are symbolic (any image size, one file), the selection is the exact K-th-value search
(`tokens.kth_largest`: no TopK or sort), and nothing branches on a size, so the graph is
TensorRT-ready.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .models.description import TowerParts
from .tokens import RETENTION_SCALE, area_weights, best_mask, fine_cells, kth_largest, ordered, rankable, take


def min_cells(retention_e4: int, cell: int = 2) -> int:
    """Fewest cells with at least one fine cell (`tokens.fine_cells`): the files accept no smaller image."""
    coarse = (cell - 1) ** 2
    return -(-(cell * cell - coarse) * RETENTION_SCALE // (cell * cell * retention_e4 - coarse * RETENTION_SCALE))


def min_grid_side(retention_e4: int, cell: int = 2) -> int:
    """Fewest patches per image side (a multiple of c) for `min_cells` cells in a square grid."""
    return cell * (math.isqrt(min_cells(retention_e4, cell) - 1) + 1)


def without_specials(tokens: torch.Tensor, special_tokens: int) -> torch.Tensor:
    """[B, N, D] patch tokens of [B, S + N, D] (see `pieces`)."""
    return pieces(tokens, [special_tokens, tokens.shape[1] - special_tokens])[1]


def pieces(tokens: torch.Tensor, sizes: list) -> list[torch.Tensor]:
    """`tokens.split(sizes, 1)` as new tensors (index_select): reshaping a slice of a batch makes
    the exporter specialise B != 1 (its contiguity check asks whether B is 1)."""
    out, start = [], 0
    for size in sizes:
        out.append(tokens.index_select(1, torch.arange(start, start + size, device=tokens.device)))
        start = start + size
    return out


def cell_part(grid: torch.Tensor, axis: int, cell_rows, cell_columns) -> torch.Tensor:
    """The first `cell_rows` x `cell_columns` of a grid's axes `axis`, `axis + 1` (see `pieces`:
    a slice would also make the exporter specialise on the sides' remainders)."""
    rows = grid.index_select(axis, torch.arange(cell_rows, device=grid.device))
    return rows.index_select(axis + 1, torch.arange(cell_columns, device=grid.device))


def shrink(x: torch.Tensor, axis: int, cell: int) -> torch.Tensor:
    """x with every block of c entries along `axis` (its length a multiple of c) area-resized to
    c - 1 (`tokens.area_weights`), as weighted sums: no matrix product, so the flop counter and the
    cost model see none, as for the 2 x 2 means of c = 2."""
    blocks = x.unflatten(axis, (x.shape[axis] // cell, cell))
    samples = [blocks.select(axis + 1, index) for index in range(cell)]
    shrunk = [sum(weight * sample for weight, sample in zip(row, samples) if weight) for row in area_weights(cell)]
    return torch.stack(shrunk, axis + 1).flatten(axis, axis + 1)


def cell_view(patches: torch.Tensor, rows, columns, cell: int = 2) -> torch.Tensor:
    """[B, C, c^2, D]: the patch tokens ([B, rows * columns, D], raster order) of each c x c cell
    of the grid's first c * (rows // c) rows and columns, cells in raster order, each cell's patches
    in raster order."""
    batch, width = patches.shape[0], patches.shape[-1]
    cell_rows, cell_columns = rows // cell, columns // cell
    grid = cell_part(patches.reshape(batch, rows, columns, width), 1, cell * cell_rows, cell * cell_columns)
    cells = grid.reshape(batch, cell_rows, cell, cell_columns, cell, width).transpose(2, 3)
    return cells.reshape(batch, cell_rows * cell_columns, cell * cell, width)


def grid_of_cells(cells: torch.Tensor, cell_rows, cell_columns, cell: int = 2) -> torch.Tensor:
    """[B, c * cell_rows, c * cell_columns, D] grid of `cell_view`'s [B, C, c^2, D] (its inverse)."""
    batch, width = cells.shape[0], cells.shape[-1]
    grid = cells.reshape(batch, cell_rows, cell_columns, cell, cell, width).transpose(2, 3)
    return grid.reshape(batch, cell * cell_rows, cell * cell_columns, width)


def leftover(patches: torch.Tensor, rows, columns, cell: int = 2) -> torch.Tensor:
    """[B, X, D] patch tokens outside every cell (the last columns, then the last rows, beyond
    c * (side // c)), in raster order. Picked by index_select, not sliced: reshaping a slice of the
    batch would make the exporter specialise B != 1."""
    batch, width = patches.shape[0], patches.shape[-1]
    grid = patches.reshape(batch, rows, columns, width)
    cell_rows, cell_columns = cell * (rows // cell), cell * (columns // cell)
    column = grid.index_select(1, torch.arange(cell_rows, device=grid.device))
    column = column.index_select(2, torch.arange(cell_columns, columns, device=grid.device))
    row = grid.index_select(1, torch.arange(cell_rows, rows, device=grid.device))
    return torch.cat([column.reshape(batch, -1, width), row.reshape(batch, -1, width)], 1)


def cell_detail(cells: torch.Tensor) -> torch.Tensor:
    """[B, C] fp32 squared distance of each cell's tokens from their mean, made `rankable`."""
    cells = cells.float()
    spread = cells - cells.mean(2, keepdim=True)
    return rankable((spread * spread).sum((2, 3)))


def choose_fine(detail: torch.Tensor, fine: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fine [B, F], coarse [B, C - F], slot [B, C]) ascending cell indices of the F most detailed
    cells (ties to the lower index) and of the others; slot[c] is cell c's row in cat([fine, coarse])."""
    count = torch.scalar_tensor(fine, dtype=torch.int64, device=detail.device)
    return split_exactly(best_mask(detail, kth_largest(detail, fine), count), fine)


def split_exactly(mask: torch.Tensor, k) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tokens.select_tokens`' (first, rest, slot) of a mask with exactly K True per row, the two
    parts picked by index_select: a slice ending at K would leave the exporter a size it cannot
    bound (min(K, N), with K a floor of a product of the grid's sides)."""
    order, slot = ordered(mask, k)
    first = order.index_select(-1, torch.arange(k, device=mask.device))
    return first, order.index_select(-1, torch.arange(k, mask.shape[-1], device=mask.device)), slot


def mixed_sequence(full: torch.Tensor, coarse: torch.Tensor, rows, columns, special_tokens: int,
                   retention_e4: int, cell: int = 2) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The blocks' input [B, S + c^2 F + (c - 1)^2 (C - F) + X, D] (specials, the fine cells'
    patches, the coarse cells' tokens, the leftover patches) from the image's tokens `full`
    [B, S + N, D] and the shrunk image's patch tokens `coarse` [B, (c - 1)^2 C, D] (raster order of
    its grid); with the cell choice (`choose_fine`)."""
    patches = without_specials(full, special_tokens)
    cells = cell_view(patches, rows, columns, cell)
    coarse_cells = cell_view(coarse, (cell - 1) * (rows // cell), (cell - 1) * (columns // cell), cell - 1)
    choice = choose_fine(cell_detail(cells), fine_cells(cells.shape[1], retention_e4, cell))
    fine, rest, _ = choice
    fine_patches = take(cells, fine, 1).flatten(1, 2)
    return torch.cat([full[:, :special_tokens], fine_patches, take(coarse_cells, rest, 1).flatten(1, 2),
                      leftover(patches, rows, columns, cell)], 1), choice


def with_leftover(inside: torch.Tensor, leftover_tokens: torch.Tensor, rows, columns, cell: int = 2) -> torch.Tensor:
    """[B, rows, columns, ...] grid from its cell part [B, c * (rows // c), c * (columns // c), ...]
    and the leftover patches' entries [B, X, ...] in `leftover`'s order."""
    batch, rest = inside.shape[0], inside.shape[3:]
    cell_rows, cell_columns = cell * (rows // cell), cell * (columns // cell)
    column_part, row_part = pieces(leftover_tokens, [cell_rows * (columns - cell_columns), (rows - cell_rows) * columns])
    grid = torch.cat([inside, column_part.reshape(batch, cell_rows, columns - cell_columns, *rest)], 2)
    return torch.cat([grid, row_part.reshape(batch, rows - cell_rows, columns, *rest)], 1)


def full_grid(hidden: torch.Tensor, choice: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows, columns,
              special_tokens: int, cell: int = 2) -> torch.Tensor:
    """[B, S + N, D] tokens in the image's order from the blocks' output `hidden` (`mixed_sequence`'s
    order): fine and leftover patches as they are, coarse cells' patches from the coarse grid (a fine
    cell standing for its outputs shrunk to (c - 1) x (c - 1)) resized bilinearly by c / (c - 1)
    (half-pixel centres)."""
    fine, rest, slot = choice
    small = cell - 1
    batch, width = hidden.shape[0], hidden.shape[-1]
    cell_rows, cell_columns = rows // cell, columns // cell
    fine_count, coarse_count = fine.shape[1], rest.shape[1]
    fine_length, coarse_length = cell * cell * fine_count, small * small * coarse_count
    specials, fine_out, coarse_out, leftover_out = pieces(
        hidden, [special_tokens, fine_length, coarse_length, hidden.shape[1] - special_tokens - fine_length - coarse_length])
    fine_out = fine_out.reshape(batch, fine_count, cell * cell, width)
    fine_small = shrink(shrink(fine_out.unflatten(2, (cell, cell)), 2, cell), 3, cell).flatten(2, 3)
    cell_states = take(torch.cat([fine_small, coarse_out.reshape(batch, coarse_count, small * small, width)], 1), slot, 1)
    image = grid_of_cells(cell_states, cell_rows, cell_columns, small).permute(0, 3, 1, 2)
    upsampled = F.interpolate(image, size=(cell * cell_rows, cell * cell_columns), mode="bilinear", align_corners=False)
    upsampled_cells = cell_view(upsampled.flatten(2).transpose(1, 2), cell * cell_rows, cell * cell_columns, cell)
    cells = take(torch.cat([fine_out, take(upsampled_cells, rest, 1)], 1), slot, 1)
    grid = with_leftover(grid_of_cells(cells, cell_rows, cell_columns, cell), leftover_out, rows, columns, cell)
    return torch.cat([specials, grid.reshape(batch, rows * columns, width)], 1)


def selection_outputs(choice: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows, columns,
                      special_tokens: int, cell: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept_index [B, S + c^2 F + X], neighbor_index [B, c^2 (C - F), 1]), the files' diagnostic
    outputs in IPCV's terms: ascending indices of the tokens computed at full resolution (specials,
    the fine cells' patches, the leftover patches), and for every other patch (ascending) its cell."""
    fine, _, slot = choice
    batch, fine_count = fine.shape
    cell_rows, cell_columns = rows // cell, columns // cell
    cells, leftovers = cell_rows * cell_columns, rows * columns - cell * cell * cell_rows * cell_columns
    is_fine = (slot < fine_count).to(torch.int64)
    per_cell = torch.stack([is_fine, torch.arange(cells, device=slot.device).expand(batch, cells)], -1)
    per_cell = per_cell[:, :, None].expand(batch, cells, cell * cell, 2)
    per_leftover = torch.stack([torch.ones(batch, leftovers, dtype=torch.int64, device=slot.device),
                                torch.zeros(batch, leftovers, dtype=torch.int64, device=slot.device)], -1)
    grid = with_leftover(grid_of_cells(per_cell, cell_rows, cell_columns, cell), per_leftover, rows, columns, cell)
    full_resolution, owner = grid.reshape(batch, rows * columns, 2).unbind(-1)
    keep, rem, _ = split_exactly(full_resolution.bool(), cell * cell * fine_count + leftovers)
    specials = torch.arange(special_tokens, device=slot.device).expand(batch, special_tokens)
    return torch.cat([specials, keep + special_tokens], 1), take(owner, rem, 1)[..., None]


class ExportableMixedResolution(torch.nn.Module):
    """pixel_values [B, C, H, W] -> (the tower's output for the full grid, kept_index, neighbor_index)
    with mixed-resolution tokens, from a tower's stock parts (`models.description.TowerParts`)."""

    def __init__(self, model: torch.nn.Module, parts: Callable[[torch.nn.Module], TowerParts], special_tokens: int,
                 retention_e4: int, cell: int = 2) -> None:
        super().__init__()
        self.model = model
        self.parts = parts(model)
        self.special_tokens, self.retention_e4, self.cell = special_tokens, retention_e4, cell

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, s, c = self.parts.patch_size, self.special_tokens, self.cell
        rows, columns = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        inside = cell_part(pixel_values, 2, c * (rows // c) * p, c * (columns // c) * p)
        shrunk = shrink(shrink(inside, 2, c), 3, c)
        full = self.parts.embed(pixel_values)
        coarse = without_specials(self.parts.embed(shrunk), s)
        hidden, choice = mixed_sequence(full, coarse, rows, columns, s, self.retention_e4, c)
        for block in self.parts.blocks:
            hidden = block(hidden)
        tokens = self.parts.head(full_grid(hidden, choice, rows, columns, s, c), columns)
        return (tokens, *selection_outputs(choice, rows, columns, s, c))
