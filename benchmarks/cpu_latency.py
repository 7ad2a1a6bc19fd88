"""ONNX Runtime CPU latency of the IPCV file vs. the original file (issue 7, target 2).

    .venv/bin/python benchmarks/cpu_latency.py --model qwen2-vl-7b-shape --tokens 1024 --retentions 0.5 0.35
    .venv/bin/python benchmarks/cpu_latency.py --model llava-1.5-7b-shape --tokens 576   # batched towers: one image
    .venv/bin/python benchmarks/cpu_latency.py --model dinov2-small --tokens 1369 --retentions 0.4 0.5 0.6 --selection mixed
    .venv/bin/python benchmarks/cpu_latency.py --model dinov2-small --tokens 1369 --retentions 0.5 0.55 --selection mixed \
        --mixed-cell 3 --resized 24 27 29

Exports the original encoder (--retention 1) and one IPCV file per retention with this tool
(verified as usual; --folder reuses files already there), then times each file on the same
single-image inputs: ORT with intra-op threads pinned to --threads, one warm-up run, median of
--runs runs. Prints the time ratio next to the FLOP floor (ipcv.md's cost model) and their quotient.
--resized G also times the original file on one image of G x G patches: what resizing the image
costs instead (the resize itself, done before the file runs, is not timed).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import onnxruntime
import torch

from ipcv_export.flops import floor_ratio
from ipcv_export.inputs import square_grid
from ipcv_export.loading import load_encoder

from exported_files import exported_files  # benchmarks/, the script's own folder


def single_image_feeds(encoder, tokens: int) -> dict:
    """The file's inputs for one image of `tokens` patches (packed: with its image_grid_thw row)."""
    rows, cols = square_grid(tokens, encoder.merge_size)
    generator = torch.Generator().manual_seed(0)
    if encoder.description.image_batch:
        p = encoder.patch_size
        return {"pixel_values": torch.randn(1, encoder.channels, rows * p, cols * p, generator=generator).numpy()}
    pixels = torch.randn(rows * cols, encoder.input_width, generator=generator)
    return {"pixel_values": pixels.numpy(), "image_grid_thw": torch.tensor([[1, rows, cols]]).numpy()}


def median_ms(path: Path, feeds: dict, threads: int, runs: int) -> float:
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, feeds)  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024])
    parser.add_argument("--retentions", type=float, nargs="+", default=[0.5, 0.35])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--folder", type=Path, help="where the files are or go (default: a temporary folder)")
    parser.add_argument("--selection", default="score", help="the IPCV files' --selection (mixed: towers that batch images)")
    parser.add_argument("--mixed-cell", type=int, default=2, help="the IPCV files' --mixed-cell (with --selection mixed)")
    parser.add_argument("--resized", type=int, nargs="*", default=[], metavar="G",
                        help="also time the original file on an image resized to G x G patches")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    prefix = f"{args.selection}-" if args.mixed_cell == 2 else f"{args.selection}{args.mixed_cell}-"
    files = exported_files(encoder, [1.0], args.folder) | exported_files(
        encoder, args.retentions, args.folder, prefix=prefix, selection=args.selection, mixed_cell=args.mixed_cell)

    defaults = encoder.method_config()
    print(f"threads={args.threads}, median of {args.runs} after 1 warm-up; "
          f"l_p={defaults.prune_layer}, Delta={defaults.as_depth}, k={defaults.neighbors}")
    print(f"{'rho':>5s} {'N':>6s} {'orig ms':>9s} {'IPCV ms':>9s} {'ratio':>6s} {'floor':>6s} {'ratio/floor':>11s}")
    for tokens in args.tokens:
        feeds = single_image_feeds(encoder, tokens)
        original = median_ms(files[1.0], feeds, args.threads, args.runs)
        for retention in args.retentions:
            ipcv = median_ms(files[retention], feeds, args.threads, args.runs)
            config = encoder.method_config(retention=retention, selection=args.selection,
                                           mixed_cell=args.mixed_cell if args.selection == "mixed" else None)
            floor = floor_ratio(encoder, config, tokens)
            print(f"{retention:5.2f} {tokens:6d} {original:9.1f} {ipcv:9.1f} {ipcv / original:6.3f} "
                  f"{floor:6.3f} {ipcv / original / floor:11.3f}")
        for grid in args.resized:
            resized = median_ms(files[1.0], single_image_feeds(encoder, grid * grid), args.threads, args.runs)
            print(f"original file on the image resized to {grid} x {grid} patches: {resized:.1f} ms, "
                  f"ratio {resized / original:.3f}")


if __name__ == "__main__":
    main()
