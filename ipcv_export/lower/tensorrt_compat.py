"""Static TensorRT compatibility check of an ONNX graph, runnable without TensorRT.

TensorRT cannot be installed everywhere this tool runs, so every export checks its ONNX graph
against what TensorRT's ONNX parser accepts (`tensorrt_ops.json`, taken from onnx-tensorrt's
operator table; its source and version are in the file):

- every operator is supported, for the data type of its data input;
- no TopK asks for more than `TOPK_MAX_K` values when N is at the profile's maximum. K is
  evaluated: read from the graph when constant, else computed by running the sub-graph that
  produces it (ONNX Runtime) on inputs of the maximum size (one image of N patches);
- no tensor has a type TensorRT rejects (double, strings, complex, ...);
- no operator whose output shape depends on tensor values (NonZero, Unique, ...).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from ..inputs import square_grid
from ..contract import INPUT_NAMES

OPS_TABLE = Path(__file__).with_name("tensorrt_ops.json")
TOPK_MAX_K = 3840
DATA_DEPENDENT_SHAPES = {"NonZero", "Unique", "NonMaxSuppression", "Compress"}
TYPE_NAMES = {TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
              TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.BOOL: "BOOL",
              TensorProto.UINT8: "UINT8", TensorProto.INT8: "INT8"}


@dataclass(frozen=True)
class Finding:
    """One incompatibility: which node, and why TensorRT would refuse it."""

    node: str
    op_type: str
    problem: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node!r}: {self.problem}"


@dataclass
class CompatReport:
    tensorrt_version: str
    max_tokens: int
    findings: list[Finding]
    topk: list[dict]  # every TopK with its evaluated K at max_tokens

    @property
    def ok(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict:
        return {"tensorrt_version": self.tensorrt_version, "max_tokens": self.max_tokens, "ok": self.ok,
                "findings": [asdict(f) | {"message": str(f)} for f in self.findings], "topk": self.topk}

    def summary(self) -> str:
        if self.ok:
            ks = ", ".join(str(t["k"]) for t in self.topk) or "none"
            return f"TensorRT {self.tensorrt_version} compatible up to N={self.max_tokens} (TopK K: {ks})"
        return f"{len(self.findings)} TensorRT incompatibilities; first: {self.findings[0]}"


def check_tensorrt_compat(model: onnx.ModelProto | str | Path, max_tokens: int) -> CompatReport:
    """Check `model` (its inputs' first dimension is N) for TensorRT at N = max_tokens."""
    folder = None
    if not isinstance(model, onnx.ModelProto):  # weights are not needed unless a K must be computed
        folder = Path(model).parent
        model = onnx.load(str(model), load_external_data=False)
    table = json.loads(OPS_TABLE.read_text())
    supported = table["operators"]
    inferred = onnx.shape_inference.infer_shapes(model)
    types = _value_types(inferred.graph)
    findings: list[Finding] = []
    topk_nodes = []
    for node in _all_nodes(model.graph):
        entry = supported.get(node.op_type)
        name = node.name or node.output[0]
        if node.domain not in ("", "ai.onnx") or entry is None:
            findings.append(Finding(name, node.op_type, "operator not supported by TensorRT's ONNX parser"))
            continue
        if node.op_type in DATA_DEPENDENT_SHAPES:
            findings.append(Finding(name, node.op_type, "output shape depends on tensor values"))
        dtype = types.get(node.input[0] if node.input and node.input[0] else node.output[0])
        if dtype is not None and TYPE_NAMES.get(dtype, "?") not in entry["types"]:
            findings.append(Finding(name, node.op_type, f"input type {TensorProto.DataType.Name(dtype)} not "
                                                        f"supported (TensorRT accepts {', '.join(entry['types'])})"))
        if node.op_type == "TopK":
            topk_nodes.append(node)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.initializer):
        dtype = value.data_type if isinstance(value, TensorProto) else value.type.tensor_type.elem_type
        if dtype not in TYPE_NAMES:
            findings.append(Finding(value.name, "tensor", f"type {TensorProto.DataType.Name(dtype)} is not a TensorRT type"))
    topk = []
    for node, k in zip(topk_nodes, _topk_sizes(inferred, folder, topk_nodes, max_tokens)):
        topk.append({"node": node.name, "k": k})
        if k > TOPK_MAX_K:
            findings.append(Finding(node.name, "TopK", f"K = {k} at N = {max_tokens} exceeds TensorRT's limit {TOPK_MAX_K}"))
    return CompatReport(table["tensorrt_version"], max_tokens, findings, topk)


def _all_nodes(graph: onnx.GraphProto):
    """Nodes of the graph and of its sub-graphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attribute.g)


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(graph.value_info) + list(graph.input) + list(graph.output)}
    types.update({t.name: t.data_type for t in graph.initializer})
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                types[node.output[0]] = value.data_type
    return types


def _topk_sizes(model: onnx.ModelProto, folder: Path | None, nodes: list[onnx.NodeProto], max_tokens: int) -> list[int]:
    """K of each TopK node at N = max_tokens: constant when the graph says so, else evaluated."""
    wanted = {node.input[1] for node in nodes}
    constants = {}
    for tensor in model.graph.initializer:  # only the K inputs: weights may live in external data
        if tensor.name in wanted:
            constants[tensor.name] = onnx.numpy_helper.to_array(tensor, base_dir=str(folder or ""))
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] in wanted and node.attribute[0].name == "value":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    sizes, computed = {}, []
    for node in nodes:
        if node.input[1] in constants:
            sizes[node.input[1]] = int(constants[node.input[1]].reshape(-1)[0])
        else:
            computed.append(node.input[1])
    if computed:
        if folder is not None:
            onnx.external_data_helper.load_external_data_for_model(model, str(folder))
        sizes.update(_evaluate(model, computed, max_tokens))
    return [sizes[node.input[1]] for node in nodes]


def _evaluate(model: onnx.ModelProto, names: list[str], max_tokens: int) -> dict[str, int]:
    """Run the sub-graph that computes `names` on zero pixels whose first dimension is max_tokens
    (and, for a packed tower, the grid of one image of max_tokens patches)."""
    import onnxruntime

    inputs = [i.name for i in model.graph.input]
    subgraph = onnx.utils.Extractor(model).extract_model(inputs, names)
    session = onnxruntime.InferenceSession(subgraph.SerializeToString(), providers=["CPUExecutionProvider"])
    merge = int({p.key: p.value for p in model.metadata_props}.get("merge_size", 1))
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == INPUT_NAMES[1]:
            feeds[arg.name] = np.array([[1, *square_grid(max_tokens, merge)]], dtype=np.int64)
            continue
        shape = [max_tokens if i == 0 else int(d) for i, d in enumerate(arg.shape)]
        feeds[arg.name] = np.zeros(shape, dtype=np.float32 if "float" in arg.type else np.int64)
    return {name: int(np.asarray(v).reshape(-1)[0]) for name, v in zip(names, session.run(names, feeds))}
