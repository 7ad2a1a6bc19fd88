"""Where the time goes: ONNX Runtime's per-node profile of the original and the IPCV file, by
operator type (issue 7: "where a target is missed, profile it").

    .venv/bin/python benchmarks/op_profile.py --model dinov2-small --tokens 1369 --retention 0.5

Exports both files with this tool (verified as usual; --folder reuses files already there), runs
each --runs times after one warm-up with ORT's profiler on, and prints per operator type the
milliseconds per run in each file and the difference. Matrix products (MatMul, Gemm) are what
the FLOP floor counts; the rest is what the floor leaves out. One image (batched towers) or one
segment (packed towers) of --tokens patches, ORT CPU, --threads intra-op threads.
"""

from __future__ import annotations

import argparse
import collections
import json
import warnings
from pathlib import Path

import numpy as np

from ipcv_export.loading import load_encoder

from exported_files import exported_files  # benchmarks/, the script's own folder

from cpu_latency import single_image_feeds  # the inputs the latency benchmark times (benchmarks/ is on sys.path)

FLOOR_OPS = {"MatMul", "FusedMatMul", "Gemm", "Conv"}
"""Operator types whose work the FLOP floor counts (FusedMatMul: ORT's MatMul with a folded transpose or scale)."""


def profile(path: Path, feeds: dict[str, np.ndarray], runs: int, threads: int) -> dict[str, float]:
    """Milliseconds per run spent in each operator type (ORT's node events, after one warm-up)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(path.with_suffix(""))
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs + 1):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    trace.unlink()
    first_run = min((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warmed = first_run["ts"] + first_run["dur"]  # the first run is the warm-up: not counted
    per_op: dict[str, float] = collections.defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["ts"] >= warmed:
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return per_op


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--tokens", type=int, default=1369, help="patches per image (batched) or per call (packed)")
    parser.add_argument("--retention", type=float, default=0.5)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--folder", type=Path, help="where the files are or go (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    files = exported_files(encoder, (1.0, args.retention), args.folder, opt_patches=args.tokens)
    feeds = single_image_feeds(encoder, args.tokens)
    original, ipcv = (profile(files[r], feeds, args.runs, args.threads) for r in (1.0, args.retention))
    total_original, total_ipcv = sum(original.values()), sum(ipcv.values())
    print(f"model {args.model}, {args.tokens} patches, rho {args.retention}, ORT CPU {args.threads} threads, "
          f"mean of {args.runs} profiled runs (node time only)")
    print(f"{'operator':<22s} {'original ms':>11s} {'IPCV ms':>9s} {'IPCV - orig':>11s} {'share of IPCV':>13s}")
    for op in sorted(set(original) | set(ipcv), key=lambda o: -ipcv.get(o, 0.0)):
        before, after = original.get(op, 0.0), ipcv.get(op, 0.0)
        if max(before, after) >= 0.05:
            print(f"{op:<22s} {before:11.1f} {after:9.1f} {after - before:11.1f} {after / total_ipcv:13.1%}")
    floor_before = sum(v for o, v in original.items() if o in FLOOR_OPS)
    floor_after = sum(v for o, v in ipcv.items() if o in FLOOR_OPS)
    print(f"{'total':<22s} {total_original:11.1f} {total_ipcv:9.1f} {total_ipcv - total_original:11.1f}")
    print(f"matrix products (what the floor counts): ratio {floor_after / floor_before:.3f}; "
          f"everything else: ratio {(total_ipcv - floor_after) / (total_original - floor_before):.3f}; "
          f"whole file: ratio {total_ipcv / total_original:.3f}")


if __name__ == "__main__":
    main()
