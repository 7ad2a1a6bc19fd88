"""Qwen2.5-VL's windowed tower through the same capture, passes and checks as Qwen2-VL."""

from __future__ import annotations

import json

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from conftest import assert_openvino_agrees, grid_inputs
from ipcv_export import Method, export
from ipcv_export.config import IpcvConfig
from ipcv_export.inputs import decomposed_grid_layout
from ipcv_export.loading import load_encoder
from ipcv_export.models.qwen2_5_vl import (block_segments, merged_places, window_lengths, window_order,
                                          window_tokens)
from ipcv_export.reference import ipcv_reference, stock_reference

# single image with partial windows at the bottom and right, two images, a video of 2 slices
GRIDS = [[[1, 20, 28]], [[1, 8, 8], [1, 12, 18]], [[2, 10, 16]]]
STOCK_TOLERANCE = 1e-5  # fp32, same operations in a different grouping of tokens


@pytest.fixture(scope="module")
def tiny25():
    return load_encoder("tiny-qwen2.5-vl")


def _inputs(encoder, grid, seed=0):
    """(grid, pixels, positions, segments), the last two as the file computes them from the grid
    (test_inputs.py checks that they equal the host definition)."""
    grid = torch.tensor(grid)
    pixels = torch.randn(int(grid.prod(1).sum()), encoder.input_width, generator=torch.Generator().manual_seed(seed))
    return grid, pixels, *decomposed_grid_layout(grid, pixels, encoder.merge_size)


def test_window_segments_tile_each_slice(tiny25):
    grid, _, positions, segments = _inputs(tiny25, [[1, 20, 28], [2, 8, 8]])
    per_block = block_segments(tiny25.module.config, positions, segments)
    full = tiny25.module.config.fullatt_block_indexes
    assert [torch.equal(a.segments, segments) and a.span is None for a in per_block] == \
        [i in full for i in range(tiny25.depth)]
    windows = per_block[0].segments
    assert len(windows.unique()) == 3 * 4 + 2  # 20 x 28 patches in 8 x 8 windows, then one per 8 x 8 slice
    first = windows[segments == 0].reshape(-1)
    assert len(first[(positions[segments == 0] < 8).all(-1)].unique()) == 1  # the top-left window


@pytest.mark.parametrize("grid", GRIDS + [[[1, 8, 40], [3, 24, 8], [1, 2, 2]], [[1, 2, 2]], [[4, 6, 10]],
                                          [[1, 30, 18], [2, 14, 6], [1, 16, 16]]])
def test_window_order_is_the_stock_window_index(tiny25, grid):
    """The graph's integer arithmetic gives the stock Python loop's order, and in it every window
    is one contiguous run of at most `window_tokens` tokens (what the band needs)."""
    config = tiny25.module.config
    grid_thw, _, positions, segments = _inputs(tiny25, grid)
    place = window_order(config, positions, segments)
    assert torch.equal(place.sort().values, torch.arange(len(place)))
    stock, _ = get_vision_window_index(grid_thw, config.spatial_merge_size, config.window_size, config.patch_size)
    assert torch.equal(merged_places(config, place), torch.argsort(stock))
    order = torch.argsort(place)
    window = block_segments(config, positions[order], segments[order])[0]
    runs = torch.unique_consecutive(window.segments, return_counts=True)[1]
    assert len(runs) == len(window.segments.unique()) and runs.max() <= window.span == window_tokens(config)
    assert runs.tolist() == window_lengths(config, grid_thw)  # the stock module's windows, in its order
    assert 0 <= window.segments.min() and window.segments.max() < len(place)  # ids below N: int32 wherever N is


@pytest.mark.parametrize("grid", GRIDS)
def test_exportable_module_and_reference_equal_the_stock_tower(tiny25, grid):
    grid_thw, pixels, positions, segments = _inputs(tiny25, grid)
    stock = stock_reference(tiny25.module, pixels, grid_thw)
    with tiny25.description.attention_context(tiny25.module):
        exportable = tiny25.description.exportable(tiny25.module)(pixels, grid_thw)
    reference = ipcv_reference(tiny25.module, pixels, grid_thw, IpcvConfig(retention=1.0),
                               description=tiny25.description).embeddings
    assert (exportable - stock).abs().max() <= STOCK_TOLERANCE
    assert (reference - stock).abs().max() <= STOCK_TOLERANCE


def test_windows_matter(tiny25):
    """Guards the test above: treating every block as full attention changes the output."""
    grid_thw, pixels, _, _ = _inputs(tiny25, GRIDS[0])
    everywhere_full = ipcv_reference(tiny25.module, pixels, grid_thw, IpcvConfig(retention=1.0)).embeddings
    assert (everywhere_full - stock_reference(tiny25.module, pixels, grid_thw)).abs().max() > 1e-3


@pytest.mark.parametrize("per_image", [False, True], ids=["call-wide", "per-image"])
def test_onnx_export_is_verified_and_tensorrt_ready(tmp_path, per_image):
    result = export("tiny-qwen2.5-vl", tmp_path / "q25.onnx", Method(retention=0.35, per_image_selection=per_image),
                    report=lambda _: None)
    manifest = json.loads((tmp_path / "q25.onnx.json").read_text())
    assert manifest["ipcv"]["per_image_selection"] is per_image
    assert manifest["architecture"] == "qwen2_5_vl"
    assert result.manifest["verification"]["verified"] and result.manifest["verification"]["worst_abs_diff"] <= 1e-4
    assert manifest["tensorrt_compat"]["ok"], manifest["tensorrt_compat"]["findings"]
    assert manifest["int32"]["ok"], manifest["int32"]["findings"]  # window ids below N
    # OpenVINO compiles it with a dynamic N (no 5-D Transpose between Reshapes) and, with window ids
    # below N, computes several images and videos in its int32 arithmetic as ONNX Runtime does
    calls = [grid_inputs(load_encoder("tiny-qwen2.5-vl"), grid, seed)[::-1] for seed, grid in enumerate(GRIDS)]
    assert_openvino_agrees(tmp_path / "q25.onnx", calls)


def test_checkpoint_folder_loads_the_tower(tmp_path, tiny25):
    from ipcv_export.llm.chat_models import load_chat_model

    chat = load_chat_model("tiny-qwen2.5-vl-chat")
    chat.model.save_pretrained(tmp_path)
    loaded = load_encoder(str(tmp_path))
    assert loaded.description.architecture == "qwen2_5_vl"
    grid_thw, pixels, _, _ = _inputs(tiny25, GRIDS[1])
    assert torch.equal(stock_reference(loaded.module, pixels, grid_thw), stock_reference(tiny25.module, pixels, grid_thw))
