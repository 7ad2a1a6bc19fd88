"""Peak memory of one ONNX Runtime CPU run of the IPCV file and the original file (issue 7, target 3).

    .venv/bin/python benchmarks/memory.py --model qwen2-vl-7b-shape --tokens 16384 --retentions 0.5

Exports the files with this tool (verified as usual; --folder reuses files already there), then
runs each file once per N in a fresh process (so one run's peak does not hide another's) and
prints that process's peak resident set size and the run's wall time. Single image, 2 threads,
ONNX Runtime's CPU memory arena off unless --arena.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import time
import warnings
from pathlib import Path

from ipcv_export.inputs import square_grid
from ipcv_export.loading import load_encoder

from exported_files import exported_files  # benchmarks/, the script's own folder


def run_once(path: str, tokens: int, merge: int, width: int, threads: int, arena: bool, order: str,
             result) -> None:
    """Child process: one session, one run; reports (peak RSS bytes, seconds)."""
    import onnxruntime
    import torch

    grid = torch.tensor([[1, *square_grid(tokens, merge)]])
    pixels = torch.randn(tokens, width, generator=torch.Generator().manual_seed(0))
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    options.execution_order = getattr(onnxruntime.ExecutionOrder, order)
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    start = time.perf_counter()
    session.run(None, {"pixel_values": pixels.numpy(), "image_grid_thw": grid.numpy()})
    seconds = time.perf_counter() - start
    result.put((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5], help="1 measures the original file")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, help="where the files are or go (default: a temporary folder)")
    parser.add_argument("--arena", action="store_true",
                        help="keep ONNX Runtime's CPU memory arena (it grows in powers of two and never shrinks, "
                             "so the peak then reflects its growth policy more than the graph's live tensors)")
    parser.add_argument("--order", default="DEFAULT", choices=["DEFAULT", "PRIORITY_BASED", "MEMORY_EFFICIENT"],
                        help="ONNX Runtime's node execution order")
    parser.add_argument("--opset", type=int, default=18,
                        help="ONNX opset of the exported files; 23 writes attention as one Attention operator")
    parser.add_argument("--runtime", default="portable", help="the files' --runtime (portable or onnxruntime)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    files = exported_files(encoder, args.retentions, args.folder, prefix=f"{args.runtime}-opset{args.opset}-",
                           opset=args.opset, runtime=args.runtime)
    context = multiprocessing.get_context("spawn")
    print(f"{'rho':>5s} {'N':>6s} {'peak RSS GB':>11s} {'run s':>7s}")
    for retention, path in files.items():
        for tokens in args.tokens:
            result = context.Queue()
            child = context.Process(target=run_once, args=(str(path), tokens, encoder.merge_size,
                                                           encoder.input_width, args.threads, args.arena, args.order,
                                                           result))
            child.start()
            child.join()
            if child.exitcode != 0:
                print(f"{retention:5.2f} {tokens:6d}  failed (exit {child.exitcode}; killed for memory?)")
                continue
            peak, seconds = result.get()
            print(f"{retention:5.2f} {tokens:6d} {peak / 1e9:11.2f} {seconds:7.1f}")


if __name__ == "__main__":
    main()
