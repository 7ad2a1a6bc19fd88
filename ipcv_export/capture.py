"""Capture: `torch.export` of the stock encoder with a dynamic number of patches N.

The stock transformers module is exported unmodified through its own extension points (see
`models/qwen2_vl.py`): the inputs are the processor's pixel_values and image_grid_thw, positions
and segment ids one custom-op node computed from them, attention one custom-op node per block.
N is one symbolic dimension, a multiple of merge^2 (the merger concatenates merge^2 consecutive
tokens), the number of images another. The example has two images, one of them a two-slice
video, so neither axis is specialised.
Towers that batch whole images have the number of images and each image's height and width in
patches as symbolic dimensions; padded towers the number of images and the padded length P.
"""

from __future__ import annotations

import torch
import torch.fx.experimental._config as fx_config

from .inputs import square_grid
from .models import LoadedEncoder
from .tokens import min_side

MAX_TOKENS = 65536
EXAMPLE_GRID = torch.tensor([[1, 8, 8], [2, 4, 6]])
MAX_IMAGES, MAX_SIDE = 256, 128
"""At most this many images per call (rows of image_grid_thw; images of a batched tower), and
patches per image side of a batched tower."""


def example_inputs(encoder: LoadedEncoder, grid_thw: torch.Tensor = EXAMPLE_GRID,
                   smallest: int = 1) -> tuple[torch.Tensor, ...]:
    """Packed towers: (pixel_values, image_grid_thw) for a grid. Batched towers: (pixel_values,) of
    two images of 5 x 7 grid multiples of patches, or more where a file needs `smallest` patches
    per image (`dynamic_shapes`). Padded towers: two images of 2 x 2 and 3 x 1 grid multiples padded
    to 7 squared multiples (neither is full). Seeded random pixels."""
    generator = torch.Generator().manual_seed(0)
    if encoder.description.padded:
        m = encoder.merge_size
        return padded_inputs([(2 * m, 2 * m), (3 * m, m)], 7 * m * m, encoder.input_width, generator)
    if encoder.description.image_batch:
        multiple = encoder.merge_size
        cell, side = encoder.patch_size * multiple, min_side(smallest, multiple) // multiple
        rows, cols = max(5, side + 1), max(7, side + 3)
        return (torch.randn(2, encoder.channels, rows * cell, cols * cell, generator=generator),)
    patches = int(grid_thw.prod(1).sum())
    return torch.randn(patches, encoder.input_width, generator=generator), grid_thw.to(torch.int64)


def dynamic_shapes(encoder: LoadedEncoder, smallest: int = 1) -> tuple[dict, ...]:
    """Packed: N = merge^2 * groups rows of pixel_values, groups in [ceil(smallest / merge^2),
    MAX_TOKENS / merge^2], and 1 to MAX_IMAGES rows of image_grid_thw. Batched: B images of H x W
    pixels, H and W multiples of the patch size times the grid multiple, with at least
    `min_side(smallest)` patches per side. `smallest`: the fewest patches (per call, per image) a
    file takes (`compress.min_patches`: where IPCV keeps a token, or mixed selection has a fine cell)."""
    if encoder.description.padded:
        square = encoder.merge_size ** 2
        images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
        cells = torch.export.Dim("cells", min=max(2, -(-smallest // square)), max=MAX_TOKENS // square)
        return {0: images, 1: cells * square}, {0: images, 1: cells * square}
    if encoder.description.image_batch:
        multiple = encoder.merge_size
        cell, side = encoder.patch_size * multiple, min_side(smallest, multiple) // multiple
        images = torch.export.Dim("images", min=1, max=MAX_IMAGES)
        rows = torch.export.Dim("rows", min=side, max=MAX_SIDE // multiple)
        cols = torch.export.Dim("cols", min=side, max=MAX_SIDE // multiple)
        return ({0: images, 2: rows * cell, 3: cols * cell},)
    group = encoder.merge_size ** 2
    groups = torch.export.Dim("groups", min=max(1, -(-smallest // group)), max=MAX_TOKENS // group)
    return {0: groups * group}, {0: torch.export.Dim("images", min=1, max=MAX_IMAGES)}


def counting_inputs(encoder: LoadedEncoder, tokens: int) -> tuple[torch.Tensor, ...]:
    """Empty inputs (shapes only, for FLOP counting) of one image of `tokens` patches: one segment
    for packed towers; for batched towers the most nearly square grid of that many patches (padded
    towers: that grid, unpadded)."""
    if encoder.description.padded:
        rows, cols = square_grid(tokens, encoder.merge_size)
        return padded_inputs([(cols, rows)], tokens, encoder.input_width)
    if encoder.description.image_batch:
        rows, cols = square_grid(tokens, encoder.merge_size)
        p = encoder.patch_size
        return (torch.empty(1, encoder.channels, rows * p, cols * p),)
    rows, cols = square_grid(tokens, encoder.merge_size)
    return torch.empty(tokens, encoder.input_width), torch.tensor([[1, rows, cols]])


def padded_inputs(grids: list[tuple[int, int]], patches: int, width: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A padded tower's (pixel_values [B, P, width] in [0, 1], image_position_ids [B, P, 2]) for
    images of (columns, rows) patches, each padded to P = `patches` as the processor pads: real
    patches first in row-major order with their (x, y), then zero pixels at (-1, -1)."""
    pixels = torch.rand(len(grids), patches, width, generator=generator)
    positions = torch.full((len(grids), patches, 2), -1, dtype=torch.int64)
    for image, (cols, rows) in enumerate(grids):
        y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        positions[image, :rows * cols] = torch.stack([x.flatten(), y.flatten()], -1)
        pixels[image, rows * cols:] = 0
    return pixels, positions


def export_symbolic(module: torch.nn.Module, example: tuple, shapes: tuple) -> torch.export.ExportedProgram:
    """torch.export with sizes treated as >= 2 (no 0/1 specialisation of derived sizes such as K)."""
    with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(module, example, dynamic_shapes=shapes)


def capture(encoder: LoadedEncoder) -> torch.export.ExportedProgram:
    """The stock encoder as an ExportedProgram: (pixel_values, image_grid_thw) -> embeddings
    for packed towers, pixel_values [B, C, H, W] -> tokens for batched ones."""
    module = encoder.description.exportable(encoder.module).eval()
    with encoder.description.attention_context(encoder.module):
        return export_symbolic(module, example_inputs(encoder), dynamic_shapes(encoder))
