"""Qwen3.5's and Qwen3-VL's vision towers: the learned position table resampled in the graph,
DeepStack's taps as outputs after image_features, files equal to the stock module at rho = 1 (taps
included), IPCV equal to the reference, TensorRT-ready, and counted FLOPs equal to the cost model."""

import pytest
import torch
from transformers.vision_utils import get_vision_interpolation_indices_and_weights

from conftest import assert_openvino_agrees, grid_inputs, verified_files
from ipcv_export import Method, export, load
from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.flops import count_call, kept_per_slice, program_flops
from ipcv_export.inputs import host_layout, patch_grid_sides
from ipcv_export.loading import load_encoder
from ipcv_export.models.qwen3_vl import table_taps
from ipcv_export.verify import check_parity

FAMILIES = ["tiny-qwen3.5", "tiny-qwen3-vl"]
STOCK_TOLERANCE = 1e-5
GRIDS = [[[1, 16, 24]],  # one image, wider than the 8 x 8 table
         [[1, 30, 6]],  # odd merged sides (15 x 3)
         [[1, 8, 8], [1, 12, 16], [2, 4, 6]],  # several images and a video in one call
         [[4, 8, 12]]]  # a video of 4 slices


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(encoder, {retention: (path, manifest)}): one verified ONNX file per retention."""
    encoder = load_encoder(request.param)
    return encoder, verified_files(encoder, tmp_path_factory.mktemp("qwen3"))


@pytest.fixture(scope="module")
def family_program(family):
    """The family's captured program, shared by the FLOP tests."""
    return capture(family[0])


@pytest.mark.parametrize("grid", [[[1, 2, 2]], *GRIDS, [[1, 64, 32]]], ids=str)
def test_table_taps_are_transformers_interpolation(grid):
    """Indices equal, weights within 1e-7, to transformers' host computation, on grids smaller and larger than the table."""
    grid_thw = torch.tensor(grid)
    pixels = torch.zeros(int(grid_thw.prod(-1).sum()), 1)
    positions, _ = host_layout(grid_thw, 2)
    indices, weights = table_taps(positions, patch_grid_sides(grid_thw, pixels), 8)
    expected_indices, expected_weights = get_vision_interpolation_indices_and_weights(
        grid_thw, 8, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert torch.equal(indices, expected_indices)
    assert (weights - expected_weights).abs().max() <= 1e-7


def _stock_outputs(encoder, pixels, grid_thw) -> list[torch.Tensor]:
    """The stock module's merged embeddings, then its DeepStack features (none for Qwen3.5)."""
    with torch.no_grad():
        out = encoder.module(pixels, grid_thw=grid_thw)
    return [out.pooler_output, *(getattr(out, "deepstack_features", None) or [])]


def test_rho1_file_equals_the_stock_module(family):
    """Every feature output, DeepStack taps included, within 1e-5 of the stock module."""
    encoder, files = family
    file = load(files[1.0][0])
    for seed, grid in enumerate(GRIDS):
        grid_thw, pixels = grid_inputs(encoder, grid, seed)
        stock = _stock_outputs(encoder, pixels, grid_thw)
        assert len(stock) == 1 + len(encoder.tap_blocks)
        for ours, theirs in zip(file.run_all(pixels, grid_thw), stock):
            assert (ours - theirs).abs().max() <= STOCK_TOLERANCE, grid


def test_ipcv_file_equals_the_reference_and_passes_the_tensorrt_check(family):
    """Kept set exact, embeddings within 1e-4 (check_parity's fp32 tolerance)."""
    encoder, files = family
    path, manifest = files[0.5]
    assert manifest["verification"]["verified"] and manifest["tensorrt_compat"]["ok"], manifest["tensorrt_compat"]
    assert manifest["int32"]["ok"], manifest["int32"]["findings"]  # at the manifest's largest calls
    file = load(path)
    config = encoder.method_config(retention=0.5)
    for seed, grid in enumerate(GRIDS):
        grid_thw, pixels = grid_inputs(encoder, grid, seed)
        check_parity(file.run_all, encoder.module, config, grid_thw, pixels, description=encoder.description)


def test_openvino_gives_onnx_runtimes_answer(family):
    """DeepStack outputs included, several images and videos, in OpenVINO CPU f32."""
    encoder, files = family
    for path, _ in files.values():
        assert_openvino_agrees(path, [grid_inputs(encoder, grid, seed)[::-1] for seed, grid in enumerate(GRIDS)])


@pytest.mark.parametrize("retention", [1.0, 0.35])
def test_counted_flops_are_the_cost_model(family, family_program, retention):
    """One image (fake tensors) and a mixed call (attention segment by segment), counted == modelled."""
    encoder, _ = family
    config, vision = encoder.method_config(retention=retention), encoder.module.config
    program = compress(family_program, encoder, config)
    for tokens in (256, 1024):
        assert program_flops(program, encoder, tokens) == encoder.description.flop_floor(
            vision, config.retention_e4, config.prune_layer, config.as_depth, tokens), tokens
    grid_thw, pixels = grid_inputs(encoder, GRIDS[2])
    counted = count_call(program, pixels, grid_thw)
    assert counted.total == encoder.description.call_flop_floor(
        vision, config.retention_e4, config.prune_layer, config.as_depth, kept_per_slice(grid_thw, counted.kept_index))


def test_a_deepstack_file_returns_the_features_a_runtime_reads(tmp_path):
    """Without --diagnostic-outputs: image_features then deepstack_features_0..2 (TensorRT Edge-LLM's
    names), in the manifest and in the file; taps after l_p differ from the stock ones (rebuilt by NGR)."""
    import onnx

    encoder = load_encoder("tiny-qwen3-vl")
    path = tmp_path / "qwen3-vl.onnx"
    result = export(encoder, path, Method(retention=0.5), report=lambda _line: None)
    names = ["image_features", "deepstack_features_0", "deepstack_features_1", "deepstack_features_2"]
    assert [o["name"] for o in result.manifest["outputs"]] == names
    assert [o.name for o in onnx.load(str(path)).graph.output] == names
    grid_thw, pixels = grid_inputs(encoder, GRIDS[0])
    outputs, stock = load(path).run_all(pixels, grid_thw), _stock_outputs(encoder, pixels, grid_thw)
    assert [o.shape for o in outputs] == [s.shape for s in stock]
    assert (outputs[1] - stock[1]).abs().max() <= STOCK_TOLERANCE  # block 1 < l_p = 3: every token computed in full
    assert (outputs[2] - stock[2]).abs().max() > 1e-3  # block 3 >= l_p: pruned, rebuilt

    file = load(path)
    for grid, rows, message in (([[1, 8, 7]], 56, "must be multiples of the merge size 2"),  # an odd side
                                ([[1, 8, 8]], 60, "has 60 rows but grid_thw describes 64 patches"),
                                ([[0, 8, 8]], 0, "must hold positive integers")):
        with pytest.raises(ValueError, match=message) as refused:
            file(torch.zeros(rows, encoder.input_width), torch.tensor(grid))
        assert "\n" not in str(refused.value)
