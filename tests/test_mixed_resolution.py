"""Mixed-resolution tokens (reference.mixed_reference): the eager reference's meaning at its two
ends, on the tiny DINOv2 built-in (random weights; the meaning does not depend on them).

Tolerance 1e-5: the same operations in another order (attention over permuted rows) or on
another path (the halved image through the stock tower)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ipcv_export import Method, Target, export, load
from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.config import IpcvConfig, UsageError
from ipcv_export.flops import floor_ratio, program_flops
from ipcv_export.mixed_resolution import min_grid_side
from ipcv_export.loading import load_encoder
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


@pytest.mark.parametrize("cell", [2, 3])
@pytest.mark.parametrize("rows,columns", [(6, 8), (5, 7)])
def test_every_cell_fine_is_the_stock_tower(parts, rows, columns, cell):
    """At rho = 1 every cell keeps its patches: the blocks see the stock tokens permuted, and the
    rebuilt grid is the stock output."""
    p = parts.patch_size
    pixels = torch.randn(2, 3, rows * p, columns * p, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = parts.head(_stock(parts, pixels), columns)
    result = mixed_reference(parts, 1, pixels, 1.0, cell=cell).embeddings
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


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
    torch.testing.assert_close(mixed_reference(parts, 1, pixels, 0.25).embeddings, expected, atol=1e-5, rtol=0)


def test_no_cell_fine_with_3x3_cells_is_the_image_shrunk_by_two_thirds(parts):
    """3 x 3 cells at rho <= 4/9: every cell is 2 x 2 tokens of the image shrunk by 2/3 (each 3
    pixels to 2 by area: (2a + b) / 3, (b + 2c) / 3), the grid resized back bilinearly."""
    p, rows, columns = parts.patch_size, 6, 9
    pixels = torch.randn(1, 3, rows * p, columns * p, generator=torch.Generator().manual_seed(2))

    def shrink(x: torch.Tensor, axis: int) -> torch.Tensor:
        a, b, c = (x.narrow(axis, start, x.shape[axis] - 2).unfold(axis, 1, 3).squeeze(-1) for start in range(3))
        return torch.stack([(2 * a + b) / 3, (b + 2 * c) / 3], axis + 1).flatten(axis, axis + 1)

    with torch.no_grad():
        small = _stock(parts, shrink(shrink(pixels, 2), 3))
        grid = small[:, 1:].transpose(1, 2).reshape(1, -1, 4, 6)
        grid = F.interpolate(grid, size=(rows, columns), mode="bilinear", align_corners=False)
        expected = parts.head(torch.cat([small[:, :1], grid.flatten(2).transpose(1, 2)], 1), columns)
    torch.testing.assert_close(mixed_reference(parts, 1, pixels, 0.44, cell=3).embeddings, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows,columns,retention_e4,cell,expected", [
    (32, 32, 5000, 2, (16, 16, 85)),  # 256 cells: 85 fine -> 4 * 85 + 171 = 511 tokens, about half of 1024
    (37, 37, 3500, 2, (18, 18, 43)),  # 518 px: 324 cells and 73 patches of the odd last row and column
    (16, 16, 2500, 2, (8, 8, 0)),
    (16, 16, 10_000, 2, (8, 8, 64)),
    (1, 9, 10_000, 2, (0, 4, 0)),  # no cell fits: every patch is left over
    (30, 30, 5000, 3, (10, 10, 10)),  # 100 cells: 10 fine -> 9 * 10 + 4 * 90 = 450 tokens of 900
    (37, 37, 6000, 3, (12, 12, 40)),  # 144 (9 * 0.6 - 4) / 5 = 40.3
    (18, 18, 4444, 3, (6, 6, 0)),  # rho <= 4/9: every cell coarse
])
def test_cell_counts(rows, columns, retention_e4, cell, expected):
    assert mixed_cells(rows, columns, retention_e4, cell) == expected


@pytest.fixture(scope="module", params=[(0.4, 2), (0.6, 3)], ids=["2x2-cells", "3x3-cells"])
def mixed_file(request, tmp_path_factory):
    """The tiny DINOv2 as an ONNX file with mixed selection (rho, cell side), through the CLI's
    pipeline (its own parity gate included), with the diagnostic outputs."""
    retention, cell = request.param
    out = tmp_path_factory.mktemp("mixed") / "tower.onnx"
    result = export("tiny-dinov2", Target(out, diagnostic_outputs=True),
                    Method(retention=retention, selection="mixed", mixed_cell=cell), report=lambda _line: None)
    return out, result.manifest, retention, cell


def test_mixed_onnx_file_is_verified_tensorrt_ready_and_priced(mixed_file):
    _, manifest, retention, cell = mixed_file
    verification = manifest["verification"]
    assert verification["verified"] and verification["worst_abs_diff"] <= 1e-4
    assert [tuple(check["grid"][2:]) for check in verification["checks"]] == [(224, 224), (168, 252), (154, 182)]
    assert manifest["tensorrt_compat"]["ok"]
    assert manifest["ipcv"]["selection"] == "mixed" and manifest["ipcv"]["neighbors"] == 1
    assert manifest["ipcv"]["mixed_cell"] == cell
    # 2 x 2 cells at rho 0.4: 3 x 3 cells of them give 9 * 6000 // 30000 = 1 fine cell; 3 x 3 cells at
    # rho 0.6: 2 x 2 cells of them give 4 * 14000 // 50000 = 1
    assert manifest["inputs"]["min_tokens"] == min_grid_side(round(retention * 10_000), cell) ** 2 == 36
    assert [output["name"] for output in manifest["outputs"]] == ["image_features", "kept_index", "neighbor_index"]
    encoder, config = load_encoder("tiny-dinov2"), IpcvConfig(retention, neighbors=1, selection="mixed", mixed_cell=cell)
    assert manifest["compute"]["ratio"] == round(floor_ratio(encoder, config, manifest["compute"]["tokens"]), 4) < 1


def test_mixed_onnx_file_equals_the_reference_on_odd_grids(mixed_file):
    """11 x 7 patches: sides with patches outside every cell for both cell sides."""
    path, _, retention, cell = mixed_file
    encoder = load_encoder("tiny-dinov2")
    parts = encoder.description.image_batch.parts(encoder.module)
    pixels = torch.randn(2, 3, 11 * 14, 7 * 14, generator=torch.Generator().manual_seed(3))
    tokens, keep, owners = load(path).run_all(pixels)
    reference = mixed_reference(parts, 1, pixels, retention, cell=cell)
    assert torch.equal(torch.as_tensor(keep), reference.keep)
    assert torch.equal(torch.as_tensor(owners), reference.neighbors)
    torch.testing.assert_close(torch.as_tensor(tokens), reference.embeddings, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cell,retention", [(3, 0.6), (4, 0.7)])
def test_milder_cells_in_the_graph_equal_the_reference_and_the_cost_model(cell, retention):
    """3 x 3 and 4 x 4 cells in the captured program: the reference's fine cells and tokens
    (1e-5) on grids with every remainder modulo the cell side, and counted FLOPs == cost model."""
    encoder = load_encoder("tiny-dinov2")
    config = encoder.method_config(retention=retention, selection="mixed", mixed_cell=cell).check(encoder.depth)
    program = compress(capture(encoder), encoder, config)
    parts = encoder.description.image_batch.parts(encoder.module)
    for seed, (images, rows, columns) in enumerate([(1, 8, 8), (2, 9, 13), (1, 12, 10), (2, 15, 11)]):
        pixels = torch.randn(images, 3, rows * 14, columns * 14, generator=torch.Generator().manual_seed(seed))
        tokens, keep, owners = program.module()(pixels)
        reference = mixed_reference(parts, 1, pixels, retention, cell=cell)
        assert torch.equal(keep, reference.keep) and torch.equal(owners, reference.neighbors)
        torch.testing.assert_close(tokens, reference.embeddings, rtol=0, atol=1e-5)
    for patches in (64, 81, 144):
        assert program_flops(program, encoder, patches) == encoder.description.flop_floor(
            encoder.module.config, config.retention_e4, config.prune_layer, config.as_depth, patches, "mixed", cell)


@pytest.mark.parametrize("model,method,message", [
    ("tiny-dinov2", Method(retention=0.4, selection="mixed", neighbors=3), "neighbors must be 1"),
    ("tiny-dinov2", Method(retention=0.25, selection="mixed"), "retention above 0.25"),
    ("tiny-dinov2", Method(retention=0.44, selection="mixed", mixed_cell=3), "retention above 0.4444"),
    ("tiny-dinov2", Method(retention=0.5, mixed_cell=3), "applies to --selection mixed only"),
    ("tiny-dinov2", Method(retention=0.4, selection="mixed", prune_layer=2), "drop --prune-layer"),
    ("tiny-qwen2-vl", Method(retention=0.5, selection="mixed"), "towers that batch whole images"),
])
def test_mixed_selection_refuses_what_it_cannot_do(model, method, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        export(model, Target(tmp_path / "x.onnx"), method, report=lambda _line: None)
    assert not list(tmp_path.iterdir())
