"""ExportedProgram -> ONNX file, through `torch.onnx.export(..., dynamo=True)`.

`ipcv::segment_attention` is decomposed into a masked scaled-dot-product attention within
torch.onnx's own decomposition run, so the file holds only standard ONNX operators. N stays a
symbolic dimension. Models over 2 GB use the external-data format (`<file>.data` beside the file).
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import torch
from onnxscript import rewriter

from .. import ops
from ..config import DEFAULT_OPSET

INPUT_NAMES = ["pixel_values", "position_ids", "segment_ids"]
TWO_GB = 2 * 1024**3
SKIPPED_REWRITE_RULES = frozenset({"SlicesSplit"})
"""onnxscript rewrite rules the optimizer skips. SlicesSplit fuses Slices that tile a tensor into
one Split; it needs static sizes, which a dynamic-N graph's slices never have, so it finds nothing
in our graphs, yet its cost grows with the square of the slices: applied alone to the unoptimised
graph it took 7.1 s for tiny Qwen2-VL at rho = 0.5 and 193 s for the 7B shape, against about 0.1 s
and 0.3 s for each other rule (benchmarks/onnx_lowering_steps.py --rules)."""


def to_onnx(program: torch.export.ExportedProgram, path: Path, output_names: list[str],
            opset: int = DEFAULT_OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Write `program` as an ONNX model at `path` (the caller makes the write atomic), with
    `metadata` as the model's metadata properties (what a runtime needs to prepare inputs)."""
    large = sum(p.numel() * p.element_size() for p in program.state_dict.values()) > TWO_GB
    input_names = INPUT_NAMES[:len(program.graph_signature.user_inputs)]  # batched towers: pixel_values only
    with ops.decomposed_by_onnx_export():
        onnx_program = torch.onnx.export(program, input_names=input_names, output_names=output_names,
                                         opset_version=opset, dynamo=True, verbose=False, optimize=False)
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
