"""The rewritten ExportedProgram and its ONNX file against the eager reference (issue 3's grid).

One ONNX file per configuration serves every grid: no re-export per shape.
"""

import itertools

import onnx
import pytest
import torch
from conftest import PARITY_GRIDS, grid_inputs

from ipcv_export.compress import compress
from ipcv_export.config import IpcvConfig
from ipcv_export.contract import OUTPUT_NAMES
from ipcv_export.layouts.packed import PACKED
from ipcv_export.lower.onnx import to_onnx
from ipcv_export.reference import stock_reference
from ipcv_export.runtime import OnnxEncoder
from ipcv_export.verify import check_parity

CONFIGS = [IpcvConfig(r, lp, d, k) for r, lp, d, k in
           itertools.product([0.5, 0.35, 0.2], [1, 3], [0, 2, 7], [1, 10])] + [
    IpcvConfig(0.35, 3, 7, 10, ngr_weighting="similarity"), IpcvConfig(0.2, 1, 2, 3, ngr_weighting="similarity"),
    IpcvConfig(0.2, 1, 2, 3, per_image_selection=True)]


LOWERED = [IpcvConfig(0.5, 3, 7, 10), IpcvConfig(0.35, 1, 0, 1), IpcvConfig(0.2, 3, 2, 10), *CONFIGS[-3:]]
"""The configurations whose ONNX file is checked too: every value of every setting at least once
(lowering is what makes this module slow; the program is what the passes rewrite)."""


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"rho{c.retention}-lp{c.prune_layer}-as{c.as_depth}-k{c.neighbors}-{c.ngr_weighting}"
                                     + ("-per-image" if c.per_image_selection else ""))
def test_program_and_onnx_match_reference(config, tiny, captured, tmp_path):
    """The rewritten program on every configuration, and its ONNX file on the LOWERED ones."""
    program = compress(captured, tiny, config)
    runners = [program.module()]  # takes (pixel_values, image_grid_thw) as the file does
    if config in LOWERED:
        path = to_onnx(program, tmp_path / "encoder.onnx", OUTPUT_NAMES, metadata={"merge_size": "2", "min_tokens": "1"})
        runners.append(OnnxEncoder(path).run_all)
    for seed, grid in enumerate(PARITY_GRIDS):
        grid_thw, pixels = grid_inputs(tiny, grid, seed)
        for runner in runners:
            check_parity(runner, tiny.module, config, grid_thw, pixels)


def test_the_lowered_configurations_cover_every_setting():
    for setting in ("retention", "prune_layer", "as_depth", "neighbors", "ngr_weighting", "per_image_selection"):
        assert {getattr(c, setting) for c in LOWERED} == {getattr(c, setting) for c in CONFIGS}, setting


def test_retention_one_is_the_original_encoder(tiny, captured, tmp_path):
    config = IpcvConfig(retention=1.0)
    program = compress(captured, tiny, config)
    path = to_onnx(program, tmp_path / "encoder.onnx", OUTPUT_NAMES, metadata={"merge_size": "2"})
    onnx_encoder = OnnxEncoder(path)
    program_runner = program.module()  # takes (pixel_values, image_grid_thw) as the file does
    for seed, grid in enumerate(PARITY_GRIDS):
        grid_thw, pixels = grid_inputs(tiny, grid, seed)
        stock = stock_reference(tiny.module, pixels, grid_thw)
        for out in (program_runner(pixels, grid_thw)[0], onnx_encoder(pixels, grid_thw)):
            assert (out - stock).abs().max().item() <= 1e-5


def test_capture_equals_stock_module(tiny, captured):
    module = captured.module()
    for seed, grid in enumerate(PARITY_GRIDS):
        grid_thw, pixels = grid_inputs(tiny, grid, seed)
        assert (module(pixels, grid_thw) - stock_reference(tiny.module, pixels, grid_thw)).abs().max() <= 1e-5


def test_ipcv_changes_the_output(tiny, captured):
    """Guards the parity grid against a model whose blocks do nothing (then any method would 'match')."""
    grid_thw, pixels = grid_inputs(tiny, [[1, 16, 16]])
    out = compress(captured, tiny, IpcvConfig(retention=0.2, prune_layer=1)).module()(pixels, grid_thw)[0]
    assert (out - stock_reference(tiny.module, pixels, grid_thw)).abs().max() > 1e-2


def test_16384_patches_run_with_no_large_topk(tiny, captured, tmp_path):
    config = IpcvConfig(retention=0.5, prune_layer=3, as_depth=2)
    path = to_onnx(compress(captured, tiny, config), tmp_path / "encoder.onnx", OUTPUT_NAMES,
                   metadata={"merge_size": "2"})
    graph = onnx.load(str(path)).graph
    constants = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer}
    constants.update({n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"})
    topk = [n for n in graph.node if n.op_type == "TopK"]
    assert not [n for n in graph.node if n.op_type in ("Sort", "NonZero", "Unique")]
    for node in topk:  # K must be a constant, independent of N, and within TensorRT's limit
        assert node.input[1] in constants and int(constants[node.input[1]].max()) <= 3840
    grid_thw, pixels = grid_inputs(tiny, [[1, 128, 128]])
    embeddings, kept, neighbors = OnnxEncoder(path).run_all(pixels, grid_thw)
    assert embeddings.shape == (4096, 48) and kept.shape == (8192,) and neighbors.shape == (8192, 10)
    assert torch.isfinite(embeddings).all()


def test_the_capture_example_is_not_special(tiny):
    """The parity grids avoid the export sample's total N, so dynamic shapes are really exercised."""
    n_example = PACKED.example_inputs(tiny)[0].shape[0]
    assert all(sum(t * h * w for t, h, w in grid) != n_example for grid in PARITY_GRIDS)
