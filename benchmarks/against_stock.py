"""Latency of the exported files in ONNX Runtime CPU against the stock transformers module in
PyTorch: what a user runs today (issue 18's latency targets).

    .venv/bin/python benchmarks/against_stock.py --model qwen2.5-vl-7b-shape --grid 1x64x80 --retentions 0.5
    .venv/bin/python benchmarks/against_stock.py --model qwen2-vl-7b-shape --grid 8x32x32 --retentions 0.5 --without-original
    .venv/bin/python benchmarks/against_stock.py --model qwen2-vl-7b-shape --grid 8x32x32 --retentions 1 0.5 --runtime onnxruntime
    .venv/bin/python benchmarks/against_stock.py --model gemma4-e2b-shape --grid 1x39x60 --retentions 0.5 0.35
    .venv/bin/python benchmarks/against_stock.py --model qwen2.5-vl-7b-shape --grid 1x64x80 --opsets 18 23
    .venv/bin/python benchmarks/against_stock.py --model qwen2.5-vl-7b-shape --grid 1x64x80 --retentions 0.5 --openvino
    .venv/bin/python benchmarks/against_stock.py --model qwen3-vl-8b-shape --grid 1x64x80 --openvino --without-onnxruntime

Exports the rho = 1 file and one IPCV file per retention with this tool (verified as usual;
--folder reuses files already there), then times, on the same inputs (one call of --grid t x h x w
patch grids), the stock module (`visual(pixel_values, grid_thw)`, SDPA attention, torch threads
pinned to --threads) and each file (ORT, intra-op threads --threads), alternated round by round so
that drift of the shared machine hits all alike: one warm-up round, median of --runs rounds.
--openvino also times each file in OpenVINO (f32, --threads inference threads, one stream) in the
same rounds, and the stock module twice per round, so that its spread shows beside the ratios;
--without-onnxruntime then leaves ONNX Runtime out (memory).
A padded tower (Gemma 4) takes each --grid entry as one image of h x w patches, padded as its
processor pads (to 9 x 280 = 2520 patches by default, --padded-length), and its stock module is
the tower and embedder (`gemma4.stock_features`).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import onnxruntime
import torch
from exported_files import exported_files  # benchmarks/, the script's own folder

from ipcv_export.config import DEFAULT_OPSET
from ipcv_export.layouts.padded import padded_inputs
from ipcv_export.loading import load_encoder
from ipcv_export.models.gemma4 import stock_features


def parse_grid(text: str) -> list[int]:
    return [int(part) for part in text.lower().split("x")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-vl-7b-shape")
    parser.add_argument("--grid", type=parse_grid, nargs="+", default=[[1, 64, 80]], help="t x h x w per image")
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="where the files are or go (default: a temporary folder)")
    parser.add_argument("--padded-length", type=int, help="a padded tower's P (default: its processor's)")
    parser.add_argument("--opsets", type=int, nargs="+", default=[DEFAULT_OPSET],
                        help="the files' --opset, one set of files each, timed in the same rounds (23: ONNX's "
                             "Attention operator)")
    parser.add_argument("--runtime", default="portable", help="the files' --runtime (portable or onnxruntime)")
    parser.add_argument("--openvino", action="store_true",
                        help="also run each file in OpenVINO (f32), and the stock module twice per round")
    parser.add_argument("--without-onnxruntime", action="store_true",
                        help="with --openvino: time the files in OpenVINO only (a 7B-shape tower's stock module, "
                             "two ONNX Runtime and two OpenVINO sessions at N = 5120 were killed for memory in 23 GB)")
    parser.add_argument("--without-original", action="store_true",
                        help="leave out the rho = 1 file (the stock module and two ORT sessions of a 7B-shape "
                             "tower at N = 8192 were killed for memory in 23 GB)")
    args = parser.parse_args()
    if args.without_onnxruntime and not args.openvino:
        parser.error("--without-onnxruntime leaves no runtime to time the files in without --openvino")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    encoder = load_encoder(args.model)
    retentions = args.retentions if args.without_original else [1.0, *args.retentions]
    files = {(rho if len(args.opsets) == 1 else f"{rho} opset {opset}"): path for opset in args.opsets
             for rho, path in exported_files(encoder, retentions, args.folder, runtime=args.runtime, opset=opset,
                                             prefix=f"{args.model}-{args.runtime}-opset{opset}-").items()}

    grid = torch.tensor(args.grid)
    generator = torch.Generator().manual_seed(0)
    if encoder.description.padded:
        length = args.padded_length or encoder.native_patches
        pixels, positions = padded_inputs([(w, h) for _, h, w in args.grid], length, encoder.input_width, generator)
        feeds = {"pixel_values": pixels.numpy(), "image_position_ids": positions.numpy()}
    else:
        pixels = torch.randn(int(grid.prod(1).sum()), encoder.input_width, generator=generator)
        feeds = {"pixel_values": pixels.numpy(), "image_grid_thw": grid.numpy()}
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    sessions = {} if args.without_onnxruntime else {
        rho: onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for rho, path in files.items()}

    def stock() -> torch.Tensor:
        if encoder.description.padded:
            return stock_features(encoder.module, pixels, positions)
        with torch.no_grad():
            return encoder.module(pixels, grid_thw=grid).pooler_output

    runners = {"stock": stock, **{f"rho={rho}": (lambda s=s: s.run(None, feeds)) for rho, s in sessions.items()}}
    if args.openvino:
        import openvino

        core = openvino.Core()
        settings = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": args.threads, "NUM_STREAMS": 1}
        compiled = {rho: core.compile_model(str(path), "CPU", settings) for rho, path in files.items()}
        runners |= {f"rho={rho} OpenVINO": (lambda c=c: c(feeds)) for rho, c in compiled.items()}
        runners["stock again"] = stock
    times: dict[str, list[float]] = {name: [] for name in runners}
    for round_ in range(args.runs + 1):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if round_:  # round 0 warms up
                times[name].append((time.perf_counter() - start) * 1e3)
    stock_ms = statistics.median(times["stock"])
    patches = f"P = {pixels.shape[1]} per image" if encoder.description.padded else f"N = {pixels.shape[0]}"
    print(f"{args.model}, grid {grid.tolist()} ({patches}), --runtime {args.runtime}, --opsets {args.opsets}, "
          f"{args.threads} threads, "
          f"median of {args.runs} alternated rounds after 1 warm-up")
    print(f"{'run':>20s} {'ms':>10s} {'/ stock':>8s}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:>20s} {median:10.1f} {median / stock_ms:8.3f}")


if __name__ == "__main__":
    main()
