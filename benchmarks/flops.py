"""FLOPs of the exported IPCV graph vs. ipcv.md's cost model and vs. the stock module.

    .venv/bin/python benchmarks/flops.py [--model qwen2-vl-7b-shape] [--tokens 1024 5120 16384]
                                         [--retentions 0.5 0.35 0.2]

Counts the FLOPs of the original and the rewritten ExportedProgram with torch.utils.flop_counter
under fake tensors (one segment of N patches), and prints them next to the analytical floor
(`ModelDescription.flop_floor`). For packed towers also the stock transformers module's own cost on
one image of N patches (`ModelDescription.stock_flops`: per window, per segment, as its varlen
kernels compute) and ipcv.md's ideal floor relative to it (Qwen2.5-VL's window attention priced
at kept queries x kept keys of each window, i.e. rho or rho^2 of the stock windows' pairs).
Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.flops import floor_ratio, program_flops
from ipcv_export.inputs import square_grid
from ipcv_export.loading import load_encoder
from ipcv_export.models import qwen2_5_vl
from ipcv_export.models.cost import ipcv_flops

TOKENS = (1024, 5120, 16384)
RETENTIONS = (0.5, 0.35, 0.2)


def ideal_floor(encoder, config, tokens: int) -> int | None:
    """ipcv.md's floor with Qwen2.5-VL's windows priced as the stock kernels price them, scaled
    by the share of queries and keys each block keeps; None for other families."""
    if encoder.description.architecture != "qwen2_5_vl":
        return None
    vision = encoder.module.config
    shape = qwen2_5_vl.tower_shape(vision)
    grid = torch.tensor([[1, *square_grid(tokens, encoder.merge_size)]])
    windows = sum(length ** 2 for length in qwen2_5_vl.window_lengths(vision, grid))

    def pairs(index: int, queries: int, keys: int) -> int:
        return windows * queries * keys // tokens ** 2 if index in shape.banded_blocks else queries * keys

    return ipcv_flops(shape, config.retention_e4, config.prune_layer, config.as_depth, tokens, config.selection, pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS),
                        help="patches per call (packed towers) or per image (batched towers)")
    parser.add_argument("--retentions", type=float, nargs="+", default=list(RETENTIONS))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    encoder = load_encoder(args.model)
    original = capture(encoder)
    defaults = encoder.method_config()
    stock_of = encoder.description.stock_flops
    print(f"model {args.model}: loaded and captured in {time.perf_counter() - start:.0f} s; "
          f"l_p={defaults.prune_layer}, Delta={defaults.as_depth}, k={defaults.neighbors}")
    print(f"{'rho':>5s} {'N':>6s} {'stock GFLOP':>11s} {'orig GFLOP':>11s} {'IPCV GFLOP':>11s} {'ratio':>7s} "
          f"{'floor':>7s} {'ratio/floor':>11s} {'IPCV/stock':>10s} {'ideal/stock':>11s} {'ratio/ideal':>11s}")
    for retention in args.retentions:
        config = encoder.method_config(retention=retention)
        program = compress(original, encoder, config)
        for tokens in args.tokens:
            before = program_flops(original, encoder, tokens)
            after = program_flops(program, encoder, tokens)
            floor = floor_ratio(encoder, config, tokens)
            row = (f"{retention:5.2f} {tokens:6d} {{stock}} {before / 1e9:11.1f} {after / 1e9:11.1f} "
                   f"{after / before:7.4f} {floor:7.4f} {after / before / floor:11.4f}")
            if stock_of is None:
                print(row.format(stock=f"{'-':>11s}"))
                continue
            stock = stock_of(encoder.module.config, torch.tensor([[1, *square_grid(tokens, encoder.merge_size)]]))
            ideal = ideal_floor(encoder, config, tokens) or encoder.description.flop_floor(
                encoder.module.config, config.retention_e4, config.prune_layer, config.as_depth, tokens, config.selection)
            print(row.format(stock=f"{stock / 1e9:11.1f}") + f" {after / stock:10.4f} {ideal / stock:11.4f} "
                  f"{after / ideal:11.4f}")


if __name__ == "__main__":
    main()
