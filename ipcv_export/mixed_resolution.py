"""Mixed-resolution tokens (`--selection mixed`; FIDELITY.md, issue 23), in graph-safe form.

Every 2 x 2 cell of an image's patch grid enters the blocks either as its four patch tokens (the
cells whose tokens differ most from their mean: detail) or as one token: the tower's own
embedding of the image halved by 2 x 2 pixel means, at the halved grid's positions. A trained
tower sees real image content at every token, at two scales, which keeps it in its training
distribution (pooling or pruning hidden states does not: FIDELITY.md). After the blocks, each
coarse cell's patches take the bilinear (x2) upsampling of the cell grid and the full grid goes
to the tower's head. Patches of an odd last row or column stay fine.

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
from .tokens import RETENTION_SCALE, best_mask, fine_cells, kth_largest, ordered, rankable, take


def min_cells(retention_e4: int) -> int:
    """Fewest cells with at least one fine cell: the files accept no smaller image."""
    return -(-3 * RETENTION_SCALE // (4 * retention_e4 - RETENTION_SCALE))


def min_grid_side(retention_e4: int) -> int:
    """Fewest patches per image side (even) for `min_cells` cells in a square grid."""
    return 2 * (math.isqrt(min_cells(retention_e4) - 1) + 1)


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


def even_part(grid: torch.Tensor, axis: int, even_rows, even_columns) -> torch.Tensor:
    """The first `even_rows` x `even_columns` of a grid's axes `axis`, `axis + 1` (see `pieces`:
    a slice would also make the exporter specialise on whether the sides are even)."""
    rows = grid.index_select(axis, torch.arange(even_rows, device=grid.device))
    return rows.index_select(axis + 1, torch.arange(even_columns, device=grid.device))


def cell_view(patches: torch.Tensor, rows, columns) -> torch.Tensor:
    """[B, C, 4, D]: the patch tokens ([B, rows * columns, D], raster order) of each 2 x 2 cell of
    the grid's even part, cells in raster order, each cell's patches in raster order."""
    batch, width = patches.shape[0], patches.shape[-1]
    cell_rows, cell_columns = rows // 2, columns // 2
    grid = even_part(patches.reshape(batch, rows, columns, width), 1, 2 * cell_rows, 2 * cell_columns)
    cells = grid.reshape(batch, cell_rows, 2, cell_columns, 2, width).transpose(2, 3)
    return cells.reshape(batch, cell_rows * cell_columns, 4, width)


def grid_of_cells(cells: torch.Tensor, cell_rows, cell_columns) -> torch.Tensor:
    """[B, 2 * cell_rows, 2 * cell_columns, D] grid of `cell_view`'s [B, C, 4, D] (its inverse)."""
    batch, width = cells.shape[0], cells.shape[-1]
    grid = cells.reshape(batch, cell_rows, cell_columns, 2, 2, width).transpose(2, 3)
    return grid.reshape(batch, 2 * cell_rows, 2 * cell_columns, width)


def leftover(patches: torch.Tensor, rows, columns) -> torch.Tensor:
    """[B, X, D] patch tokens outside every cell (an odd last column, then an odd last row), in
    raster order. Picked by index_select, not sliced: reshaping a slice of the batch would make
    the exporter specialise B != 1."""
    batch, width = patches.shape[0], patches.shape[-1]
    grid = patches.reshape(batch, rows, columns, width)
    even_rows, even_columns = 2 * (rows // 2), 2 * (columns // 2)
    column = grid.index_select(1, torch.arange(even_rows, device=grid.device))
    column = column.index_select(2, torch.arange(even_columns, columns, device=grid.device))
    row = grid.index_select(1, torch.arange(even_rows, rows, device=grid.device))
    return torch.cat([column.reshape(batch, -1, width), row.reshape(batch, -1, width)], 1)


def cell_detail(cells: torch.Tensor) -> torch.Tensor:
    """[B, C] fp32 squared distance of each cell's four tokens from their mean, made `rankable`."""
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
                   retention_e4: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The blocks' input [B, S + 4F + (C - F) + X, D] (specials, the fine cells' patches, the
    coarse tokens, the leftover patches) from the image's tokens `full` [B, S + N, D] and the
    halved image's patch tokens `coarse` [B, C, D]; with the cell choice (`choose_fine`)."""
    patches = without_specials(full, special_tokens)
    cells = cell_view(patches, rows, columns)
    choice = choose_fine(cell_detail(cells), fine_cells(cells.shape[1], retention_e4))
    fine, rest, _ = choice
    fine_patches = take(cells, fine, 1).flatten(1, 2)
    return torch.cat([full[:, :special_tokens], fine_patches, take(coarse, rest, 1),
                      leftover(patches, rows, columns)], 1), choice


def with_leftover(even: torch.Tensor, leftover_tokens: torch.Tensor, rows, columns) -> torch.Tensor:
    """[B, rows, columns, ...] grid from its even part [B, 2 * (rows // 2), 2 * (columns // 2), ...]
    and the leftover patches' entries [B, X, ...] in `leftover`'s order."""
    batch, rest = even.shape[0], even.shape[3:]
    even_rows, even_columns = 2 * (rows // 2), 2 * (columns // 2)
    column_part, row_part = pieces(leftover_tokens, [even_rows * (columns - even_columns), (rows - even_rows) * columns])
    grid = torch.cat([even, column_part.reshape(batch, even_rows, columns - even_columns, *rest)], 2)
    return torch.cat([grid, row_part.reshape(batch, rows - even_rows, columns, *rest)], 1)


def full_grid(hidden: torch.Tensor, choice: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows, columns,
              special_tokens: int) -> torch.Tensor:
    """[B, S + N, D] tokens in the image's order from the blocks' output `hidden` (`mixed_sequence`'s
    order): fine and leftover patches as they are, coarse cells' patches from the cell grid (a fine
    cell standing for the mean of its four) upsampled x2 bilinearly (half-pixel centres)."""
    fine, rest, slot = choice
    batch, width = hidden.shape[0], hidden.shape[-1]
    cell_rows, cell_columns = rows // 2, columns // 2
    fine_count, coarse_count = fine.shape[1], rest.shape[1]
    specials, fine_out, coarse_out, leftover_out = pieces(
        hidden, [special_tokens, 4 * fine_count, coarse_count, hidden.shape[1] - special_tokens - 4 * fine_count - coarse_count])
    fine_out = fine_out.reshape(batch, fine_count, 4, width)
    cell_states = take(torch.cat([fine_out.mean(2), coarse_out], 1), slot, 1)
    image = cell_states.transpose(1, 2).reshape(batch, width, cell_rows, cell_columns)
    upsampled = F.interpolate(image, size=(2 * cell_rows, 2 * cell_columns), mode="bilinear", align_corners=False)
    upsampled_cells = cell_view(upsampled.flatten(2).transpose(1, 2), 2 * cell_rows, 2 * cell_columns)
    cells = take(torch.cat([fine_out, take(upsampled_cells, rest, 1)], 1), slot, 1)
    grid = with_leftover(grid_of_cells(cells, cell_rows, cell_columns), leftover_out, rows, columns)
    return torch.cat([specials, grid.reshape(batch, rows * columns, width)], 1)


def selection_outputs(choice: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows, columns,
                      special_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept_index [B, S + 4F + X], neighbor_index [B, 4(C - F), 1]), the files' diagnostic outputs
    in IPCV's terms: ascending indices of the tokens computed at full resolution (specials, the fine
    cells' patches, the leftover patches), and for every other patch (ascending) its cell."""
    fine, _, slot = choice
    batch, fine_count = fine.shape
    cell_rows, cell_columns = rows // 2, columns // 2
    cells, leftovers = cell_rows * cell_columns, rows * columns - 4 * cell_rows * cell_columns
    is_fine = (slot < fine_count).to(torch.int64)
    per_cell = torch.stack([is_fine, torch.arange(cells, device=slot.device).expand(batch, cells)], -1)
    per_cell = per_cell[:, :, None].expand(batch, cells, 4, 2)
    per_leftover = torch.stack([torch.ones(batch, leftovers, dtype=torch.int64, device=slot.device),
                                torch.zeros(batch, leftovers, dtype=torch.int64, device=slot.device)], -1)
    grid = with_leftover(grid_of_cells(per_cell, cell_rows, cell_columns), per_leftover, rows, columns)
    full_resolution, cell = grid.reshape(batch, rows * columns, 2).unbind(-1)
    keep, rem, _ = split_exactly(full_resolution.bool(), 4 * fine_count + leftovers)
    specials = torch.arange(special_tokens, device=slot.device).expand(batch, special_tokens)
    return torch.cat([specials, keep + special_tokens], 1), take(cell, rem, 1)[..., None]


class ExportableMixedResolution(torch.nn.Module):
    """pixel_values [B, C, H, W] -> (the tower's output for the full grid, kept_index, neighbor_index)
    with mixed-resolution tokens, from a tower's stock parts (`models.description.TowerParts`)."""

    def __init__(self, model: torch.nn.Module, parts: Callable[[torch.nn.Module], TowerParts], special_tokens: int,
                 retention_e4: int) -> None:
        super().__init__()
        self.model = model
        self.parts = parts(model)
        self.special_tokens, self.retention_e4 = special_tokens, retention_e4

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, s = self.parts.patch_size, self.special_tokens
        rows, columns = pixel_values.shape[2] // p, pixel_values.shape[3] // p
        halved = F.avg_pool2d(even_part(pixel_values, 2, 2 * (rows // 2) * p, 2 * (columns // 2) * p), 2)
        full = self.parts.embed(pixel_values)
        coarse = without_specials(self.parts.embed(halved), s)
        hidden, choice = mixed_sequence(full, coarse, rows, columns, s, self.retention_e4)
        for block in self.parts.blocks:
            hidden = block(hidden)
        tokens = self.parts.head(full_grid(hidden, choice, rows, columns, s), columns)
        return (tokens, *selection_outputs(choice, rows, columns, s))
