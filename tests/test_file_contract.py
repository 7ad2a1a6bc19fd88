"""What a file offers a runtime: the processor's two inputs, `image_features` alone unless the
diagnostics are asked for, and a clear refusal of files written for the earlier contract."""

import json
import shutil

import onnx
import pytest
import torch
from conftest import grid_inputs
from onnx import TensorProto, helper

from ipcv_export import Method, Target, UsageError, export, load
from ipcv_export.config import IpcvConfig
from ipcv_export.contract import OUTPUT_NAMES
from ipcv_export.lower.onnx import keep_outputs
from ipcv_export.verify import check_parity


@pytest.fixture(scope="module")
def diagnostic_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("diagnostics") / "encoder.onnx"
    export(tiny, Target(out, diagnostic_outputs=True), Method(retention=0.5), report=lambda _line: None)
    return out


def test_diagnostic_outputs_follow_image_features_when_asked(diagnostic_file, tiny):
    manifest = json.loads(diagnostic_file.with_name("encoder.onnx.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == OUTPUT_NAMES
    encoder = load(diagnostic_file)
    assert [o.name for o in encoder.session.get_outputs()] == OUTPUT_NAMES
    grid_thw, pixels = grid_inputs(tiny, [[1, 12, 20], [2, 8, 8]], seed=3)
    check_parity(encoder.run_all, tiny.module, IpcvConfig(), grid_thw, pixels)  # kept set exact, 1e-4


def test_removing_the_diagnostics_leaves_the_verified_computation(diagnostic_file, tiny, tmp_path):
    trimmed = tmp_path / "trimmed.onnx"
    shutil.copy(diagnostic_file, trimmed)
    keep_outputs(trimmed, OUTPUT_NAMES[:1])
    full, lean = onnx.load(str(diagnostic_file)), onnx.load(str(trimmed))
    onnx.checker.check_model(lean, full_check=True)
    assert [o.name for o in lean.graph.output] == ["image_features"]
    assert len(lean.graph.node) <= len(full.graph.node)
    assert [i.name for i in lean.graph.input] == ["pixel_values", "image_grid_thw"]
    for seed, grid in enumerate(([[1, 16, 16]], [[1, 8, 8], [3, 4, 6]])):
        grid_thw, pixels = grid_inputs(tiny, grid, seed)
        outputs = load(trimmed).run_all(pixels, grid_thw)
        assert len(outputs) == 1 and torch.equal(outputs[0], load(diagnostic_file).run_all(pixels, grid_thw)[0])


def _earlier_contract_file(path):
    """An ONNX file with the inputs files had before they computed positions and segments."""
    inputs = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["N", 1176]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["N", 2]),
              helper.make_tensor_value_info("segment_ids", TensorProto.INT64, ["N"])]
    output = helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", 1176])
    graph = helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["embeddings"])], "earlier", inputs, [output])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def test_files_of_the_earlier_contract_are_refused_in_one_line(tmp_path):
    _earlier_contract_file(tmp_path / "old.onnx")
    with pytest.raises(UsageError, match="exported by an earlier ipcv-export .*re-export it with this version") as err:
        load(tmp_path / "old.onnx")
    assert "\n" not in str(err.value)
    (tmp_path / "old.pt2").write_bytes(b"not read: the manifest is checked first")
    tensors = [{"name": n} for n in ("pixel_values", "position_ids", "segment_ids")]
    (tmp_path / "old.pt2.json").write_text(json.dumps({"inputs": {"tensors": tensors, "merge_size": 2,
                                                                  "min_tokens": 4, "input_width": 1176}}))
    with pytest.raises(UsageError, match="re-export it with this version"):
        load(tmp_path / "old.pt2")
