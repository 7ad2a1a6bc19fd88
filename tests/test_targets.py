"""Deployment targets: the TensorRT check and builder, .pt2 files, and the parity gate per file."""

import copy
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from conftest import PARITY_GRIDS, grid_inputs
from onnx import TensorProto, helper

import ipcv_export.pipeline as pipeline
from ipcv_export import IpcvConfig, Target, export, load
from ipcv_export.capture import capture
from ipcv_export.cli import EXIT_NO_TENSORRT, EXIT_PARITY, EXIT_USAGE, main
from ipcv_export.compress import compress
from ipcv_export.config import ShapeProfile
from ipcv_export.contract import OUTPUT_NAMES
from ipcv_export.lower import tensorrt
from ipcv_export.lower.onnx import to_onnx
from ipcv_export.lower.tensorrt_compat import check_tensorrt_compat
from ipcv_export.tokens import NEIGHBOR_CHUNKS
from ipcv_export.verify import check_parity

QUIET = {"report": lambda _line: None}


@pytest.fixture(scope="module")
def tiny_onnx(tiny, captured, tmp_path_factory):
    program = compress(captured, tiny, IpcvConfig())
    return to_onnx(program, tmp_path_factory.mktemp("onnx") / "encoder.onnx", OUTPUT_NAMES)


def _graph_with(nodes, extra_outputs=(), initializers=()):
    """A small ONNX model over x: float [N], with the given nodes and outputs."""
    graph = helper.make_graph(
        nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])],
        [helper.make_tensor_value_info(name, elem, None) for name, elem in extra_outputs],
        initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_project_exports_pass_the_tensorrt_check(tiny_onnx):
    report = check_tensorrt_compat(tiny_onnx, max_tokens=65536)
    assert report.ok, report.findings
    assert [t["k"] for t in report.topk] == [IpcvConfig().neighbors] * NEIGHBOR_CHUNKS


def test_onnx_lowering_leaves_standard_operators_and_the_libraries_as_it_found_them(tiny_onnx):
    """The attention is decomposed inside torch.onnx's run and the optimizer runs without one rule:
    both are scoped, so torch's decomposition table and onnxscript's rule table come out unchanged,
    and the file holds default-domain operators only (no ipcv:: node, a Conv without the broken bias)."""
    import torch._decomp
    from onnxscript import rewriter

    from ipcv_export.lower.onnx import SKIPPED_REWRITE_RULES

    model = onnx.load(str(tiny_onnx))
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    assert [len(node.input) for node in model.graph.node if node.op_type == "Conv"] == [2]
    assert torch.ops.ipcv.segment_attention.default not in torch._decomp.decomposition_table
    assert SKIPPED_REWRITE_RULES <= {rule.name for rule in rewriter._DEFAULT_REWRITE_RULES}


def test_topk_size_is_evaluated_at_the_profile_maximum():
    """K = N // 4 computed from the input's shape: 4096 at N = 16384 is refused, 2048 at 8192 is not."""
    four = helper.make_tensor("four", TensorProto.INT64, [1], [4])
    nodes = [helper.make_node("Shape", ["x"], ["n"]),
             helper.make_node("Div", ["n", "four"], ["k"]),
             helper.make_node("TopK", ["x", "k"], ["values", "indices"])]
    model = _graph_with(nodes, [("values", TensorProto.FLOAT), ("indices", TensorProto.INT64)], [four])
    large = check_tensorrt_compat(model, max_tokens=16384)
    assert not large.ok and "K = 4096 at N = 16384" in str(large.findings[0])
    assert check_tensorrt_compat(model, max_tokens=8192).ok


def test_check_reads_only_what_it_needs_from_external_data(tmp_path):
    """Files over 2 GB keep weights in `<file>.data`; a constant K is read from there too."""
    k = helper.make_tensor("k", TensorProto.INT64, [1], [5])
    scale = helper.make_tensor("scale", TensorProto.FLOAT, [1], [2.0])
    nodes = [helper.make_node("Mul", ["x", "scale"], ["scaled"]),
             helper.make_node("TopK", ["scaled", "k"], ["values", "indices"])]
    model = _graph_with(nodes, [("values", TensorProto.FLOAT), ("indices", TensorProto.INT64)], [k, scale])
    onnx.save(model, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    report = check_tensorrt_compat(tmp_path / "m.onnx", max_tokens=65536)
    assert report.ok and report.topk == [{"node": "", "k": 5}]


def test_unsupported_ops_and_types_are_flagged():
    nodes = [helper.make_node("Unique", ["x"], ["unique"]),
             helper.make_node("NonZero", ["x"], ["nonzero"]),
             helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.DOUBLE),
             helper.make_node("Cast", ["x"], ["counts"], to=TensorProto.INT64),
             helper.make_node("CumSum", ["counts", "axis"], ["running"])]
    axis = helper.make_tensor("axis", TensorProto.INT64, [], [0])
    model = _graph_with(nodes, [("unique", TensorProto.FLOAT), ("nonzero", TensorProto.INT64),
                                ("wide", TensorProto.DOUBLE), ("running", TensorProto.INT64)], [axis])
    problems = [str(f) for f in check_tensorrt_compat(model, max_tokens=1024).findings]
    assert any("Unique" in p and "not supported" in p for p in problems)
    assert any("NonZero" in p and "depends on tensor values" in p for p in problems)
    assert any("CumSum" in p and "INT64 not supported" in p for p in problems)
    assert any("DOUBLE is not a TensorRT type" in p for p in problems)


@pytest.mark.skipif(tensorrt.tensorrt_available(), reason="tensorrt is installed: the missing-TensorRT path cannot run")
def test_engine_without_tensorrt_keeps_the_checked_onnx_and_says_how(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pipeline, "load_encoder", lambda _name: tiny)
    out = tmp_path / "encoder.engine"
    assert main(["--model", "tiny-qwen2-vl", "-o", str(out), "--precision", "fp16", "--max-patches", "8192", "-q"]) == EXIT_NO_TENSORRT
    err = capsys.readouterr().err
    assert "TensorRT is not installed" in err and "pip install tensorrt" in err
    assert f"trtexec --onnx={tmp_path}/encoder.onnx --saveEngine={out}" in err and "--fp16" in err
    assert "--maxShapes=pixel_values:8192x1176,image_grid_thw:16x3" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "encoder.onnx.json"]
    manifest = json.loads((tmp_path / "encoder.onnx.json").read_text())
    assert manifest["verification"]["verified"] and manifest["tensorrt_compat"]["ok"]
    assert manifest["tensorrt_build"]["built"] is False


def test_trtexec_command_and_profile_checks(tmp_path):
    shapes = tensorrt.profile_shapes({"input_width": 588}, ShapeProfile(64, 1024, 4096))
    command = tensorrt.trtexec_command(tmp_path / "a b.onnx", tmp_path / "e.engine", shapes, "bf16", tmp_path / "cache")
    assert f"'--onnx={tmp_path}/a b.onnx'" in command and "--bf16" in command
    assert "--minShapes=pixel_values:64x588,image_grid_thw:1x3" in command
    assert f"--timingCacheFile={tmp_path}/cache" in command
    with pytest.raises(ValueError, match="multiple of 4"):
        ShapeProfile(62, 1024, 4096).check(2, 2, 65536)
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeProfile(64, 8192, 4096).check(2, 2, 65536)


@pytest.mark.skipif(not tensorrt.tensorrt_available(), reason="tensorrt is not importable here (see README, TensorRT)")
def test_engine_build_and_parity(tiny, tmp_path):
    out = tmp_path / "encoder.engine"
    result = export(tiny, Target(out, precision="fp16", timing_cache=tmp_path / "cache"), **QUIET)
    assert result.manifest["verification"]["verified"] and (tmp_path / "cache").exists()
    assert load(out)(*grid_inputs(tiny, [[1, 16, 16]])[1::-1]).shape == (64, 48)


SERVE = """
import sys, torch
path, kind = sys.argv[1], sys.argv[2]
inputs = torch.load(sys.argv[3])
module = torch._inductor.aoti_load_package(path) if kind == "aoti" else torch.export.load(path).module()
with torch.no_grad():
    torch.save([module(*args)[0] for args in inputs], sys.argv[4])
assert not any(name.startswith("ipcv_export") for name in sys.modules), "the project was imported"
"""


@pytest.mark.parametrize("format", ["aoti", "exported-program"])
def test_pt2_files_match_the_reference_and_load_without_the_project(format, tiny, tmp_path):
    """The gate passes, the runtime matches the reference on every parity grid, and a plain
    torch process (nothing of this project imported) reproduces the outputs."""
    out = tmp_path / "encoder.pt2"
    result = export(tiny, Target(out, format=format), **QUIET)
    assert result.manifest["verification"]["runtime"] == format
    encoder = load(out)
    inputs, expected = [], []
    for seed, grid in enumerate(PARITY_GRIDS):
        grid_thw, pixels = grid_inputs(tiny, grid, seed)
        check_parity(encoder.run_all, tiny.module, IpcvConfig(), grid_thw, pixels)
        inputs.append((pixels, grid_thw))
        expected.append(encoder(pixels, grid_thw))
    torch.save(inputs, tmp_path / "inputs.pt")
    subprocess.run([sys.executable, "-c", SERVE, str(out), format, str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   check=True, cwd=tmp_path)
    for served, mine in zip(torch.load(tmp_path / "out.pt"), expected):
        assert torch.equal(served, mine)


def test_gate_refuses_a_wrong_weight_and_writes_nothing(tiny, tmp_path, monkeypatch, capsys):
    """The rewritten program is built from a copy of the encoder with one weight off by 0.01."""
    real_compress = pipeline.compress

    def wrong_weight(program, encoder, config):
        broken = copy.deepcopy(encoder)
        with torch.no_grad():
            broken.module.blocks[4].mlp.fc2.weight[0, 0] += 0.01
        return real_compress(capture(broken), broken, config)

    monkeypatch.setattr(pipeline, "compress", wrong_weight)
    monkeypatch.setattr(pipeline, "load_encoder", lambda _name: tiny)
    out = tmp_path / "encoder.onnx"
    out.write_bytes(b"previous file")
    assert main(["--model", "tiny-qwen2-vl", "-o", str(out), "-q"]) == EXIT_PARITY
    assert "max abs diff" in capsys.readouterr().err
    assert out.read_bytes() == b"previous file" and [p.name for p in tmp_path.iterdir()] == ["encoder.onnx"]


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp16"], "--precision fp16 applies to TensorRT engines"),
    (["--format", "aoti"], "format aoti writes .pt2 files"),
    (["--min-patches", "30"], "must be a multiple of 4"),
    (["--opt-patches", "99996"], "min <= opt <= max"),
])
def test_target_options_are_checked_before_any_work(argv, message, tmp_path, capsys):
    assert main(["--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.onnx"), *argv]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_onnx_runtime_providers_are_checked(tiny_onnx):
    with pytest.raises(ValueError, match="lacks NoSuchExecutionProvider"):
        load(tiny_onnx, providers=["NoSuchExecutionProvider"])
    assert np.isfinite(load(tiny_onnx, providers=["CPUExecutionProvider"])(
        torch.randn(64, 1176), torch.tensor([[1, 8, 8]])).numpy()).all()


def test_missing_manifest_for_pt2_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt2").write_bytes(b"PK")
    with pytest.raises(ValueError, match="needs its manifest"):
        load(tmp_path / "x.pt2")
