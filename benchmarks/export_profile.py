"""Where an export's time goes (issue 19: profile first, then remove the cost at its source).

    .venv/bin/python benchmarks/export_profile.py --model tiny-qwen2-vl --retention 0.5 1.0

Runs the whole export (verified, as `ipcv-export` does) under cProfile, once per model and
retention, and prints the stage lines the tool prints, then the seconds inside the steps that
make up the stages: the second `torch.export` in `compress`, the passes themselves, the FLOP
count, torch.onnx's decompositions (the attention's among them) and translation to ONNX,
onnxscript's optimizer, ONNX saving, the TensorRT check and verification. Steps nest (the
translation runs inside torch.onnx.export), so the rows are not a partition; "ONNX nodes" is the
written file's node count. Retention 1.0 is the anchor issue 19 asks for: the stock tower through the same
toolchain.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path

import onnx

import ipcv_export

STEPS = {  # row label -> (file name part, function name) whose cumulative time the row reports
    "re-export after the passes (compress)": ("ipcv_export/capture.py", "export_symbolic"),
    "passes (graph rewriting only)": ("ipcv_export/passes/__init__.py", "run_passes"),
    "FLOP count (both programs)": ("ipcv_export/flops.py", "program_flops"),
    "torch.onnx.export (decompositions and translation)": ("torch/onnx/__init__.py", "export"),
    "  run_decompositions (torch.onnx's, the attention's included)": ("torch/export/exported_program.py", "run_decompositions"),
    "  ExportedProgram -> ONNX IR (translation)": ("torch/onnx/_internal/exporter/_core.py", "_exported_program_to_onnx_program"),
    "optimizer (ONNXProgram.optimize)": ("torch/onnx/_internal/exporter/_onnx_program.py", "optimize"),
    "  onnxscript optimize_ir (constant folding, rewrite rules, clean-up)": ("onnxscript/optimizer/_optimizer.py", "optimize_ir"),
    "ONNX save": ("torch/onnx/_internal/exporter/_onnx_program.py", "save"),
    "TensorRT check": ("ipcv_export/lower/tensorrt_compat.py", "check_tensorrt_compat"),
    "verification (reference + ONNX Runtime)": ("ipcv_export/pipeline.py", "_verify_stage"),
}


def cumulative(stats: pstats.Stats, file_part: str, function: str) -> float | None:
    """Cumulative seconds of the outermost calls of `function` in a file whose path ends in
    `file_part` (recursive calls are counted once by cProfile's cumulative time)."""
    found = [value[3] for (filename, _line, name), value in stats.stats.items()
             if name == function and filename.replace("\\", "/").endswith(file_part)]
    return sum(found) if found else None


def profile_export(model: str, retention: float, folder: Path) -> tuple[list[str], dict[str, float | None], int]:
    lines: list[str] = []
    output = folder / f"{model}-{retention}.onnx"
    profiler = cProfile.Profile()
    profiler.enable()
    ipcv_export.export(model, output, ipcv_export.Method(retention=retention), report=lines.append)
    profiler.disable()
    stats = pstats.Stats(profiler)
    steps = {label: cumulative(stats, *where) for label, where in STEPS.items()}
    nodes = len(onnx.load(str(output), load_external_data=False).graph.node)
    return lines, steps, nodes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="built-in or checkpoint folder (repeat; default tiny-qwen2-vl)")
    parser.add_argument("--retention", type=float, nargs="+", default=[0.5, 1.0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.model or ["tiny-qwen2-vl"]:
            for retention in args.retention:
                lines, steps, nodes = profile_export(model, retention, Path(tmp))
                stage_lines = [line for line in lines if line.endswith(" s") and not line.startswith(" ")]
                total = sum(float(line.rsplit(" ", 2)[-2]) for line in stage_lines)
                print(f"\n## {model}, retention {retention}: stages sum to {total:.1f} s, {nodes} ONNX nodes "
                      "(under cProfile, which slows Python-heavy steps)")
                for line in stage_lines:
                    print(f"  {line}")
                print("| step | s |\n|---|---|")
                for label, seconds in steps.items():
                    print(f"| {label} | {'-' if seconds is None else f'{seconds:.1f}'} |")


if __name__ == "__main__":
    main()
