"""The file's in-graph inputs: `ipcv::grid_layout` equals the host definition (`host_layout`) on
many grids, eagerly and as the ONNX operators a file holds, and those operators are TensorRT-ready."""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ipcv_export.inputs import decomposed_grid_layout, host_layout
from ipcv_export.lower.onnx import to_onnx
from ipcv_export.lower.tensorrt_compat import check_tensorrt_compat

MERGE = 2


def _grids(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Odd, tall, wide and tiny images, videos of up to 4 slices, up to 9 images in one call."""
    rng = np.random.default_rng(seed)
    fixed = [[[1, 2, 2]], [[1, 2, 40]], [[1, 38, 2]], [[4, 6, 10]], [[1, 14, 22], [3, 4, 8], [1, 2, 2]]]
    grids = [torch.tensor(g) for g in fixed]
    for _ in range(count - len(fixed)):
        images = int(rng.integers(1, 10))
        grids.append(torch.tensor([[int(rng.integers(1, 5)), *(MERGE * rng.integers(1, 16, size=2)).tolist()]
                                   for _ in range(images)]))
    return grids


GRIDS = _grids(40)


class _Layout(torch.nn.Module):
    def forward(self, pixel_values, image_grid_thw):
        return torch.ops.ipcv.grid_layout(image_grid_thw, pixel_values, MERGE)


def _pixels(grid: torch.Tensor) -> torch.Tensor:
    return torch.zeros(int(grid.prod(1).sum()), 3)


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    """The op exported and lowered as in every file: dynamic rows of pixel_values and of the grid."""
    example = torch.tensor([[1, 8, 8], [2, 4, 6]])
    shapes = ({0: torch.export.Dim("groups", min=1, max=16384) * MERGE**2}, {0: torch.export.Dim("images", min=1, max=256)})
    program = torch.export.export(_Layout(), (_pixels(example), example), dynamic_shapes=shapes)
    return to_onnx(program, tmp_path_factory.mktemp("layout") / "layout.onnx", ["position_ids", "segment_ids"])


def test_decomposition_equals_the_host_definition():
    for grid in GRIDS:
        positions, segments = decomposed_grid_layout(grid, _pixels(grid), MERGE)
        expected = host_layout(grid, MERGE)
        assert torch.equal(positions, expected[0]) and torch.equal(segments, expected[1]), grid.tolist()


def test_onnx_operators_equal_the_host_definition(layout_file):
    session = ort.InferenceSession(str(layout_file), providers=["CPUExecutionProvider"])
    for grid in GRIDS:
        positions, segments = session.run(None, {"pixel_values": _pixels(grid).numpy(), "image_grid_thw": grid.numpy()})
        expected = host_layout(grid, MERGE)
        assert np.array_equal(positions, expected[0].numpy()) and np.array_equal(segments, expected[1].numpy()), grid.tolist()


def test_onnx_operators_pass_the_tensorrt_check(layout_file):
    report = check_tensorrt_compat(layout_file, max_tokens=16384)
    assert report.ok, report.findings
