"""`--runtime onnxruntime`: full-attention blocks loop over the segments of a call (images, video
slices) instead of one dense masked product. Exact as the portable form, and what ONNX Runtime
runs costs the sum over segments of L_q x L_k, counted from its own profile."""

import json

import onnx
import pytest

from conftest import assert_openvino_agrees, grid_inputs
from ipcv_export import Method, Target, export, load
from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.flops import count_call, onnx_attention_flops
from ipcv_export.lower import segment_loop
from ipcv_export.loading import load_encoder
from ipcv_export.reference import stock_reference
from ipcv_export.verify import check_parity

FAMILIES = ["tiny-qwen2-vl", "tiny-qwen2.5-vl"]
RETENTIONS = [1.0, 0.5]
LOOP_ROWS = 40
"""Query rows per loop iteration in these files: below the tiny segments' lengths (60 to 384), so
that segments are split into pieces, one of them partial (the production value is 2048)."""
GRIDS = [[[3, 6, 10]],  # a video of 3 slices of 60 patches: not a multiple of the band's 64 or of LOOP_ROWS
         [[1, 16, 24], [1, 8, 8], [2, 4, 6]],  # images of different sizes and a video in one call
         [[1, 20, 28]]]  # one image, partial windows at the bottom and the right (Qwen2.5-VL)


@pytest.fixture(scope="module", params=[(f, r) for f in FAMILIES for r in RETENTIONS], ids=lambda p: f"{p[0]}-rho{p[1]}")
def loop_file(request, tmp_path_factory):
    """(encoder, config, path, manifest) of one ONNX Runtime-form file, with its diagnostics."""
    family, retention = request.param
    encoder = load_encoder(family)
    out = tmp_path_factory.mktemp("loop") / "encoder.onnx"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segment_loop, "LOOP_QUERY_ROWS", LOOP_ROWS)
        result = export(encoder, Target(out, runtime="onnxruntime", diagnostic_outputs=True),
                        Method(retention=retention), report=lambda _line: None)
    return encoder, encoder.method_config(retention=retention), out, result.manifest


def test_the_file_loops_and_says_it_is_for_onnx_runtime(loop_file):
    _, _, path, manifest = loop_file
    assert manifest["runtime"] == "onnxruntime" and manifest["verification"]["verified"]
    assert "Loop" in {node.op_type for node in onnx.load(str(path)).graph.node}
    assert json.loads(path.with_name("encoder.onnx.json").read_text())["runtime"] == "onnxruntime"
    assert "tensorrt_compat" in manifest  # reported, not enforced, for an ONNX Runtime file
    assert manifest["int32"]["ok"], manifest["int32"]["findings"]  # enforced for every file, the loop's rows included


def test_onnx_runtime_form_is_exact(loop_file):
    """rho = 1 equals the stock module within 1e-5; IPCV equals the reference (kept set exact,
    embeddings within 1e-4)."""
    encoder, config, path, _ = loop_file
    file = load(path)
    for seed, grid in enumerate(GRIDS):
        grid_thw, pixels = grid_inputs(encoder, grid, seed)
        if config.retention == 1.0:
            stock = stock_reference(encoder.module, pixels, grid_thw)
            assert (file(pixels, grid_thw) - stock).abs().max().item() <= 1e-5, grid
        else:
            check_parity(file.run_all, encoder.module, config, grid_thw, pixels, description=encoder.description)


def test_openvino_gives_onnx_runtimes_answer(loop_file):
    """Several images of different sizes and videos, through the Loop, in OpenVINO CPU f32."""
    encoder, _, path, _ = loop_file
    assert_openvino_agrees(path, [grid_inputs(encoder, grid, seed)[::-1] for seed, grid in enumerate(GRIDS)])


def test_attention_costs_the_sum_over_segments(loop_file):
    """What ONNX Runtime ran (its profile) is at most 1.10 x what the attention needs segment by
    segment; a dense product over the call would be 8 x for the video here, 2.5 x for the images."""
    encoder, config, path, _ = loop_file
    program = compress(capture(encoder), encoder, config)
    for grid in ([[8, 8, 8]], [[1, 16, 16], [1, 8, 8], [1, 4, 4]]):
        grid_thw, pixels = grid_inputs(encoder, grid)
        needed = count_call(program, pixels, grid_thw).attention
        ran = onnx_attention_flops(path, {"pixel_values": pixels.numpy(), "image_grid_thw": grid_thw.numpy()})
        assert needed <= ran <= 1.10 * needed, (grid, ran / needed)


def test_the_portable_form_is_the_dense_one_this_replaces(tiny, captured, tmp_path):
    """Guards the measure above: the portable file runs the same video at 8 x the need."""
    out = tmp_path / "portable.onnx"
    export(tiny, out, Method(retention=1.0), report=lambda _line: None)
    grid_thw, pixels = grid_inputs(tiny, [[8, 8, 8]])
    needed = count_call(compress(captured, tiny, tiny.method_config(retention=1.0)), pixels, grid_thw).attention
    ran = onnx_attention_flops(out, {"pixel_values": pixels.numpy(), "image_grid_thw": grid_thw.numpy()})
    assert ran == pytest.approx(8 * needed, rel=0.01)
