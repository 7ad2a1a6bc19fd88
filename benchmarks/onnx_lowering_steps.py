"""The ONNX lowering's steps timed one by one, without a profiler (issue 19).

    .venv/bin/python benchmarks/onnx_lowering_steps.py --model qwen2-vl-7b-shape --retention 0.35

Captures and compresses the model as `ipcv-export` does, then times, each alone: torch.onnx.export
(its decomposition run, the attention's included, and the translation), the optimizer as
`lower/onnx.py` runs it, and saving. With --rules it then times every onnxscript default rewrite
rule applied alone to a fresh unoptimised copy of the graph, and prints the rules that changed
something or took over 0.3 s: the measurement behind `SKIPPED_REWRITE_RULES`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import onnx_ir as ir
import torch
from onnxscript import rewriter
from onnxscript.rewriter import pattern

from ipcv_export import ops
from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.config import DEFAULT_OPSET
from ipcv_export.contract import INPUT_NAMES, OUTPUT_NAMES
from ipcv_export.loading import load_encoder
from ipcv_export.lower.onnx import TWO_GB, _optimize


def unoptimised(program: torch.export.ExportedProgram) -> torch.onnx.ONNXProgram:
    input_names = INPUT_NAMES[:len(program.graph_signature.user_inputs)]
    with ops.decomposed_by_onnx_export():
        return torch.onnx.export(program, input_names=input_names, output_names=OUTPUT_NAMES,
                                 opset_version=DEFAULT_OPSET, dynamo=True, verbose=False, optimize=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-qwen2-vl")
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--rules", action="store_true", help="also time each rewrite rule alone")
    args = parser.parse_args()
    encoder = load_encoder(args.model)
    start = time.perf_counter()
    program = compress(capture(encoder), encoder, encoder.method_config(retention=args.retention))
    print(f"capture + passes: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    onnx_program = unoptimised(program)
    print(f"torch.onnx.export (decompositions, translation): {time.perf_counter() - start:.1f} s, "
          f"{len(list(onnx_program.model.graph))} nodes")
    proto = ir.to_proto(onnx_program.model) if args.rules else None
    start = time.perf_counter()
    _optimize(onnx_program)
    print(f"optimizer: {time.perf_counter() - start:.1f} s, {len(list(onnx_program.model.graph))} nodes")
    large = sum(p.numel() * p.element_size() for p in program.state_dict.values()) > TWO_GB
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        onnx_program.save(str(Path(folder) / "x.onnx"), external_data=large)
        print(f"save: {time.perf_counter() - start:.1f} s")
    if proto is not None:
        model = ir.from_proto(proto)
        for rule in rewriter._DEFAULT_REWRITE_RULES:
            start = time.perf_counter()
            changed = pattern.RewriteRuleSet([rule]).apply_to_model(model)
            seconds = time.perf_counter() - start
            if changed or seconds > 0.3:
                print(f"  rule {rule.name}: {changed} rewrites, {seconds:.2f} s")


if __name__ == "__main__":
    main()
