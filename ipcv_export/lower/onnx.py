"""ExportedProgram -> ONNX file, through `torch.onnx.export(..., dynamo=True)`.

The custom ops (`ipcv::segment_attention`, `ipcv::grid_layout`) are decomposed within torch.onnx's
own decomposition run, so the file holds only standard ONNX operators. N stays a
symbolic dimension. Models over 2 GB use the external-data format (`<file>.data` beside the file).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from unittest import mock

import onnx
import torch
from onnxscript import rewriter

from .. import ops
from ..config import DEFAULT_OPSET
from ..contract import INPUT_NAMES
from . import segment_loop

TWO_GB = 2 * 1024**3
SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})
"""onnxscript rewrite rules the optimizer skips. SlicesSplit fuses Slices that tile a tensor into
one Split; it needs static sizes, which a dynamic-N graph's slices never have, so it finds nothing
in our graphs, yet its cost grows with the square of the slices: applied alone to the unoptimised
graph it took 7.1 s for tiny Qwen2-VL at rho = 0.5 and 193 s for the 7B shape, against about 0.1 s
and 0.3 s for each other rule (benchmarks/onnx_lowering_steps.py --rules)."""


def to_onnx(program: torch.export.ExportedProgram, path: Path, output_names: list[str],
            opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None,
            attention_form: str = "portable", input_names: Sequence[str] | None = None) -> Path:
    """Write `program` as an ONNX model at `path` (the caller makes the write atomic), with
    `metadata` as the model's metadata properties (what a runtime needs to prepare inputs).
    `attention_form`: one of ops.ATTENTION_FORMS. `input_names`: by default INPUT_NAMES, as many
    as the program takes (batched towers: pixel_values only)."""
    large = sum(p.numel() * p.element_size() for p in program.state_dict.values()) > TWO_GB
    input_names = list(input_names or INPUT_NAMES[:len(program.graph_signature.user_inputs)])
    with ops.decomposed_by_onnx_export(attention_form):
        onnx_program = torch.onnx.export(program, input_names=input_names, output_names=output_names,
                                         opset_version=opset, dynamo=True, verbose=False, optimize=False,
                                         custom_translation_table=segment_loop.translation_table())
    _optimize(onnx_program)
    onnx_program.model.metadata_props.update(metadata or {})
    onnx_program.save(str(path), external_data=large)
    return path


def _optimize(onnx_program: torch.onnx.ONNXProgram) -> None:
    """What `torch.onnx.export(optimize=True)` runs (onnxscript's constant folding, rewrite rules and
    clean-up), less SKIPPED_REWRITE_RULES. The rules matter beyond size: one removes the all-zero
    Conv bias torch.onnx writes for a bias-free Conv3d with a wrong [out, 2] shape, which ONNX
    Runtime refuses."""
    rules = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if rules is None:  # an onnxscript without the rule table: its optimizer as it comes
        onnx_program.optimize()
        return
    kept = tuple(rule for rule in rules if rule.name not in SKIPPED_REWRITE_RULES)
    with mock.patch.object(rewriter, "_DEFAULT_REWRITE_RULES", kept):
        onnx_program.optimize()


def keep_outputs(path: Path, names: Sequence[str]) -> None:
    """Rewrite the ONNX file at `path` (its external data untouched) so that it returns only the
    outputs `names`, and drop the nodes no remaining output needs.

    The parity gate reads the diagnostic outputs (kept and neighbour indices); a runtime that
    expects one output must get one, so they are removed after the gate. The removed nodes feed
    nothing else, so what remains computes exactly what was verified."""
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    unknown = set(names) - {o.name for o in graph.output}
    if unknown:
        raise ValueError(f"{path.name} has no output {sorted(unknown)}")
    kept_outputs = [o for o in graph.output if o.name in names]
    needed = {o.name for o in kept_outputs}
    kept_nodes = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept_nodes.append(node)
            needed.update(node.input)
            needed.update(_subgraph_inputs(node))
    del graph.output[:]
    graph.output.extend(kept_outputs)
    del graph.node[:]
    graph.node.extend(reversed(kept_nodes))
    initializers = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    onnx.save(model, str(path))


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If, Loop, Scan bodies) read from the enclosing graph, or may."""
    names: set[str] = set()
    for attribute in node.attribute:
        subgraphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs
        for subgraph in subgraphs:
            for inner in subgraph.node:
                names.update(inner.input)
                names.update(_subgraph_inputs(inner))
    return names
