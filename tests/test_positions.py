"""Position tables resized as the files resize them: equal to torch's bicubic interpolate."""

import pytest
import torch

from ipcv_export.models.positions import bicubic_resize, resized_positions


@pytest.mark.parametrize("side", [16, 24, 37])
def test_bicubic_resize_equals_torch_interpolate(side):
    """Shrinking, enlarging, non-square and degenerate grids, within 1e-5 of torch's kernel (fp32
    rounding: the values are of order 1)."""
    grid = torch.randn(1, 8, side, side, generator=torch.Generator().manual_seed(side))
    for rows, cols in [(side, side), (32, 32), (11, 13), (64, 45), (2, 2), (1, 5), (side + 1, side - 1)]:
        expected = torch.nn.functional.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        assert torch.allclose(bicubic_resize(grid, rows, cols), expected, atol=1e-5, rtol=0)


def test_the_native_grid_is_the_table_itself():
    """At the table's own size every weight is 0 or 1: the positions come back bit for bit."""
    table = torch.randn(1, 1 + 37 * 37, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(resized_positions(table, 1, 37, 37), table)
