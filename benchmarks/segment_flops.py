"""FLOPs of calls with several segments (images, video slices): what the attention needs segment by
segment, against what ONNX Runtime ran for the file (issue 33's first target); and the whole call
counted, against the per-call cost model and the stock module.

    .venv/bin/python benchmarks/segment_flops.py --model qwen2-vl-7b-shape --retentions 1 0.5 \
        --grids 8x32x32 32x16x16 1x32x32,1x32x32,1x32x32,1x32x32 1x32x32,1x16x16,1x8x8
    .venv/bin/python benchmarks/segment_flops.py --model qwen2-vl-7b-shape --runtime tensorrt \
        --retentions 1 0.5 [--per-image-selection] --grids 1x32x32,1x32x32,... (a video passed as rows)

Exports one file per retention with this tool (verified as usual; --folder reuses files already
there), then for each call: "needed" runs the exported program eagerly and adds up, per attention
core, the sum over segments of L_q x L_k (banded blocks: their band), from the real segment ids;
"ran" is every attention product in ONNX Runtime's profile of one run of the file (run it with
--runtime portable to see the dense masked product's count). "counted" is the whole call's matrix
work with attention priced so, "model" the cost model's price of the call (`call_flop_floor`, for
the kept counts per slice the selection chose), "stock" the stock module's (`stock_flops`).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.flops import count_call, kept_per_slice, onnx_attention_flops
from ipcv_export.loading import load_encoder

from exported_files import exported_files  # benchmarks/, the script's own folder


def parse_call(text: str) -> list[list[int]]:
    """'8x32x32' -> [[8, 32, 32]]; '1x32x32,1x16x16' -> two rows of image_grid_thw."""
    return [[int(part) for part in row.split("x")] for row in text.lower().split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--retentions", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument("--grids", type=parse_call, nargs="+", default=[[[8, 32, 32]]],
                        help="one call each: t x h x w rows joined by commas")
    parser.add_argument("--runtime", default="onnxruntime", help="the files' --runtime")
    parser.add_argument("--per-image-selection", action="store_true",
                        help="export and count with each image (row) selecting its own tokens")
    parser.add_argument("--folder", type=Path, help="where the files are or go (default: a temporary folder)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    encoder = load_encoder(args.model)
    selection = "-per-image" if args.per_image_selection else ""
    files = exported_files(encoder, args.retentions, args.folder, prefix=f"{args.model}-{args.runtime}{selection}-",
                           per_image_selection=args.per_image_selection, runtime=args.runtime)
    captured = capture(encoder)
    print(f"{args.model}, --runtime {args.runtime}{' --per-image-selection' if selection else ''}; "
          "GFLOPs of one call: attention, then the whole call")
    print(f"{'rho':>5s} {'call':>36s} {'N':>6s} {'needed':>9s} {'ran':>9s} {'ran/needed':>10s} "
          f"{'counted':>9s} {'model':>9s} {'stock':>9s}")
    vision = encoder.module.config
    for retention, path in files.items():
        config = encoder.method_config(retention=retention, per_image_selection=args.per_image_selection)
        program = compress(captured, encoder, config)
        for call in args.grids:
            grid_thw = torch.tensor(call)
            pixels = torch.randn(int(grid_thw.prod(1).sum()), encoder.input_width,
                                 generator=torch.Generator().manual_seed(0))
            counted = count_call(program, pixels, grid_thw)
            ran = onnx_attention_flops(path, {"pixel_values": pixels.numpy(), "image_grid_thw": grid_thw.numpy()})
            model = encoder.description.call_flop_floor(vision, config.retention_e4, config.prune_layer, config.as_depth,
                                                        kept_per_slice(grid_thw, counted.kept_index))
            stock = encoder.description.stock_flops(vision, grid_thw)
            print(f"{retention:5.2f} {str(call):>36s} {pixels.shape[0]:6d} {counted.attention / 1e9:9.1f} "
                  f"{ran / 1e9:9.1f} {ran / counted.attention:10.4f} {counted.total / 1e9:9.1f} {model / 1e9:9.1f} "
                  f"{stock / 1e9:9.1f}", flush=True)


if __name__ == "__main__":
    main()
