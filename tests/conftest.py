"""Shared fixtures: the built-in tiny encoder and its captured program, built once per session."""

from __future__ import annotations

import os

import pytest
import torch

from ipcv_export.capture import capture
from ipcv_export.loading import load_encoder


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # one core per worker: oversubscribing two cores slows both


@pytest.fixture(scope="session")
def tiny():
    return load_encoder("tiny-qwen2-vl")


@pytest.fixture(scope="session")
def captured(tiny):
    return capture(tiny)


def verified_files(encoder, folder, retentions=(1.0, 0.5)) -> dict:
    """{retention: (path, manifest)}: one verified ONNX file per retention, with the kept and
    neighbour indices (what a family's module-scoped fixture shares among its tests)."""
    from ipcv_export import Method, Target, export

    files = {}
    for retention in retentions:
        path = folder / f"rho{retention}.onnx"
        result = export(encoder, Target(path, diagnostic_outputs=True), Method(retention=retention),
                        report=lambda _line: None)
        files[retention] = path, result.manifest
    return files


OPENVINO_TOLERANCE = 1e-5
"""OpenVINO CPU f32 against ONNX Runtime on the same file: the same operations, other kernels."""


def assert_openvino_agrees(path, calls, warm: bool = False) -> None:
    """The file run in OpenVINO (CPU, f32) gives ONNX Runtime's outputs on each call's inputs:
    features within OPENVINO_TOLERANCE and the same kept and neighbour indices where the file
    has them. `warm`: compare OpenVINO's second call of each input shape (test_tensorrt_form says why)."""
    from ipcv_export import load

    in_onnxruntime, in_openvino = load(path), load(path, runtime="openvino")
    for inputs in calls:
        if warm:
            in_openvino.run_all(*inputs)
        theirs, ours = in_onnxruntime.run_all(*inputs), in_openvino.run_all(*inputs)
        assert len(theirs) == len(ours)
        for index, (expected, got) in enumerate(zip(theirs, ours)):
            assert expected.shape == got.shape and expected.dtype == got.dtype, (path.name, index)
            if expected.is_floating_point():
                assert (expected - got).abs().max().item() <= OPENVINO_TOLERANCE, (path.name, index)
            else:
                assert torch.equal(expected, got), (path.name, index)


def grid_inputs(encoder, grid: list[list[int]], seed: int = 0):
    """(image_grid_thw, pixel_values) for a grid, seeded pixels: what the processor gives a packed file."""
    grid_thw = torch.tensor(grid)
    patches = int(grid_thw.prod(1).sum())
    pixels = torch.randn(patches, encoder.input_width, generator=torch.Generator().manual_seed(seed))
    return grid_thw, pixels


# The grids every parity test runs: single images of 8x8, 16x24 and 64x64 patches, two images of
# different sizes in one call, and a video of 3 temporal slices.
PARITY_GRIDS = [[[1, 8, 8]], [[1, 16, 24]], [[1, 64, 64]], [[1, 8, 8], [1, 12, 16]], [[3, 8, 12]]]
