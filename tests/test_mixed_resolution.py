"""Mixed-resolution tokens (reference.mixed_reference): the eager reference's meaning at its two
ends, on the tiny DINOv2 built-in (random weights; the meaning does not depend on them).

Tolerance 1e-5: the same operations in another order (attention over permuted rows) or on
another path (the halved image through the stock tower)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipcv_export.models import load_encoder
from ipcv_export.reference import mixed_cells, mixed_reference


@pytest.fixture(scope="module")
def parts():
    encoder = load_encoder("tiny-dinov2")
    return encoder.description.image_batch.parts(encoder.module)


def _stock(parts, pixels):
    x = parts.embed(pixels)
    for block in parts.blocks:
        x = block(x)
    return x


@pytest.mark.parametrize("rows,columns", [(6, 8), (5, 7)])
def test_every_cell_fine_is_the_stock_tower(parts, rows, columns):
    """At rho = 1 every cell keeps its four patches: the blocks see the stock tokens permuted, and
    the rebuilt grid is the stock output."""
    p = parts.patch_size
    pixels = torch.randn(2, 3, rows * p, columns * p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = parts.head(_stock(parts, pixels), columns)
    torch.testing.assert_close(mixed_reference(parts, 1, pixels, 1.0), expected, atol=1e-5, rtol=0)


def test_no_cell_fine_is_the_halved_image_upsampled(parts):
    """At rho <= 1/4 (even grid) every cell is coarse: the stock tower on the image with 2 x 2 pixel
    means, its patch grid upsampled x2 bilinearly before the head, the special token as it comes."""
    p, rows, columns = parts.patch_size, 6, 4
    pixels = torch.randn(1, 3, rows * p, columns * p, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        small = _stock(parts, F.avg_pool2d(pixels, 2))
        grid = small[:, 1:].transpose(1, 2).reshape(1, -1, rows // 2, columns // 2)
        grid = F.interpolate(grid, scale_factor=2, mode="bilinear", align_corners=False)
        expected = parts.head(torch.cat([small[:, :1], grid.flatten(2).transpose(1, 2)], 1), columns)
    torch.testing.assert_close(mixed_reference(parts, 1, pixels, 0.25), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows,columns,retention_e4,expected", [
    (32, 32, 5000, (16, 16, 85)),  # 256 cells: 85 fine -> 4 * 85 + 171 = 511 tokens, about half of 1024
    (37, 37, 3500, (18, 18, 43)),  # 518 px: 324 cells and 73 patches of the odd last row and column
    (16, 16, 2500, (8, 8, 0)),
    (16, 16, 10_000, (8, 8, 64)),
    (1, 9, 10_000, (0, 4, 0)),  # no cell fits: every patch is left over
])
def test_cell_counts(rows, columns, retention_e4, expected):
    assert mixed_cells(rows, columns, retention_e4) == expected
