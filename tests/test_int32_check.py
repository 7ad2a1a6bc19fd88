"""The export's int32 check (lower/int32_check.py) on graphs built for it: it refuses integers that
pass 2^31 at the manifest's largest inputs, whether computed exactly or only bounded, and passes
arithmetic that stays below."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ipcv_export import Method, Target, UsageError, export
from ipcv_export.layouts import LAYOUTS
from ipcv_export.layouts.packed import Packed
from ipcv_export.lower import int32_check
from ipcv_export.lower.int32_check import INT32_MAX, Bounded, check_int32

PACKED = {"layout": "packed", "merge_size": 2, "input_width": 6, "max_tokens": 65536, "max_images": 256,
          "tensors": [{"name": "pixel_values"}, {"name": "image_grid_thw"}]}
"""A packed tower's manifest inputs, at the shipped limits (65536 patches, 256 images)."""


def _file(tmp_path, nodes, outputs, initializers=()):
    """An ONNX file of `nodes` over the packed inputs (N = 4 * s, S images), its outputs int64."""
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["4*s", 6]),
         helper.make_tensor_value_info("image_grid_thw", TensorProto.INT64, ["S", 3])],
        [helper.make_tensor_value_info(name, TensorProto.INT64, None) for name in outputs],
        [numpy_helper.from_array(np.array(value, dtype=np.int64), name) for name, value in initializers])
    path = tmp_path / "graph.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def _columns(*names):
    """Nodes splitting image_grid_thw into its t, h and w columns ([S] each)."""
    return [helper.make_node("Gather", ["image_grid_thw", f"column_{i}"], [name], axis=1) for i, name in enumerate(names)]


COLUMNS = [(f"column_{i}", i) for i in range(3)]


def test_window_ids_with_a_power_of_two_stride_are_refused(tmp_path):
    """The old Qwen2.5-VL window id, (segment * 2^16 + row) * 2^16 + column, computed from the grid:
    exactly at the extreme calls, it passes 2^31 (the video of 16384 slices has segment ids up to
    16383), and the finding names the node."""
    nodes = [*_columns("t", "h", "w"),
             helper.make_node("Shape", ["image_grid_thw"], ["S"], start=0, end=1),
             helper.make_node("Squeeze", ["S"], ["S_scalar"]),
             helper.make_node("Range", ["zero", "S_scalar", "one"], ["segment"]),
             helper.make_node("Mul", ["segment", "stride"], ["shifted"]),
             helper.make_node("Add", ["shifted", "h"], ["row_id"]),
             helper.make_node("Mul", ["row_id", "stride"], ["window_id"], name="window_id_node"),
             helper.make_node("Add", ["window_id", "w"], ["ids"])]
    path = _file(tmp_path, nodes, ["ids"], [*COLUMNS, ("zero", 0), ("one", 1), ("stride", 2 ** 16)])
    report = check_int32(path, LAYOUTS[PACKED["layout"]].extreme_calls(PACKED))
    assert not report.ok
    assert any(f.node == "window_id_node" and f.bound[1] > INT32_MAX for f in report.findings)
    assert "window_id_node" in report.summary() and "outside int32" in report.summary()


def test_ids_below_n_pass(tmp_path):
    """Ids built from the token count and the grid that stay below N pass, and the widest value
    met is recorded."""
    nodes = [*_columns("t", "h", "w"),
             helper.make_node("Mul", ["h", "w"], ["area"]),
             helper.make_node("Mul", ["area", "t"], ["tokens"]),
             helper.make_node("ReduceSum", ["tokens"], ["total"], keepdims=0),
             helper.make_node("Range", ["zero", "total", "one"], ["index"]),
             helper.make_node("Div", ["index", "two"], ["ids"])]
    report = check_int32(_file(tmp_path, nodes, ["ids"], [*COLUMNS, ("zero", 0), ("one", 1), ("two", 2)]),
                         LAYOUTS[PACKED["layout"]].extreme_calls(PACKED))
    assert report.ok, report.summary()
    assert report.widest == 65536  # the total token count of every extreme call


def test_a_flat_index_into_n_by_n_is_refused_by_its_bound(tmp_path):
    """Indices that depend on features are bounded, not computed: an ArgMax over the N patches
    scaled by N (a flat index into N x N) can reach 65535 * 65536 > 2^31."""
    nodes = [helper.make_node("ArgMax", ["pixel_values"], ["best"], axis=0, keepdims=0),
             helper.make_node("Shape", ["pixel_values"], ["n"], start=0, end=1),
             helper.make_node("Mul", ["best", "n"], ["flat"], name="flat_index")]
    report = check_int32(_file(tmp_path, nodes, ["flat"]), LAYOUTS[PACKED["layout"]].extreme_calls(PACKED))
    assert [f.node for f in report.findings][:1] == ["flat_index"]
    low, high = report.findings[0].bound
    assert low == 0 and high == 65535 * 65536


def test_an_unknown_operator_on_integers_cannot_be_proved(tmp_path):
    """An integer the check cannot bound is a finding too: absence of proof is not proof."""
    nodes = [helper.make_node("Unique", ["image_grid_thw"], ["values"], name="unique")]
    report = check_int32(_file(tmp_path, nodes, ["values"]), {"call": {
        "pixel_values": Bounded((-1.0, 1.0), (8, 6)), "image_grid_thw": Bounded((1.0, 4.0), (2, 3), True)}})
    assert [str(f).split(":")[0] for f in report.findings] == ["Unique 'unique'"]
    assert "cannot be bounded" in str(report.findings[0])


def test_extreme_calls_stay_within_the_manifest():
    """Every packed call has at most max_tokens patches and max_images rows, sides multiples of
    the merge size; the padded calls' positions lie in the position table."""
    for name, call in LAYOUTS[PACKED["layout"]].extreme_calls(PACKED).items():
        grid = call["image_grid_thw"]
        assert grid.prod(1).sum() <= 65536 and len(grid) <= 256 and not (grid[:, 1:] % 2).any(), name
        assert call["pixel_values"].shape == (int(grid.prod(1).sum()), 6)
    padded = {"layout": "padded", "merge_size": 3, "input_width": 5, "max_tokens": 65529, "max_images": 256,
              "position_table": 256, "tensors": [{"name": "pixel_values"}, {"name": "image_position_ids"}]}
    calls = LAYOUTS[padded["layout"]].extreme_calls(padded)
    positions = calls["image"]["image_position_ids"]
    assert positions.shape == (1, 65529, 2) and positions.max() < 256 and positions.min() == -1
    assert calls["images"]["image_position_ids"].bound == (-1.0, 255.0)


def test_the_export_refuses_a_file_that_can_overflow(tiny, tmp_path, monkeypatch):
    """End to end: a grid far beyond the manifest (a 2 x 2^30 strip) makes the tiny Qwen2-VL file's
    position arithmetic pass int32; the export stops in one line and keeps nothing."""
    def beyond(_layout, inputs):
        grid = np.array([[1, 2, 2 ** 30]], dtype=np.int64)
        return {"strip": {"pixel_values": Bounded((-1.0, 1.0), (2 ** 31, inputs["input_width"])),
                          "image_grid_thw": grid}}

    monkeypatch.setattr(Packed, "extreme_calls", beyond)
    out = tmp_path / "encoder.onnx"
    with pytest.raises(UsageError, match="refused, nothing written: an integer can leave int32"):
        export(tiny, Target(out), Method(retention=1.0), report=lambda _line: None)
    assert list(tmp_path.iterdir()) == []


def test_the_manifest_records_the_check(tiny, tmp_path):
    out = tmp_path / "encoder.onnx"
    export(tiny, Target(out), Method(retention=1.0), report=lambda _line: None)
    record = json.loads(out.with_name("encoder.onnx.json").read_text())["int32"]
    assert record["ok"] and record["calls"] == ["strip", "column", "square", "video", "images"]
    assert 65536 <= record["largest_integer"] <= INT32_MAX and not record["findings"]
    assert int32_check.COMPUTED_LIMIT < 65536 ** 2  # the N x N masks are bounded, never computed
