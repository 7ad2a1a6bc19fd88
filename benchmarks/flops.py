"""FLOPs of the exported IPCV graph vs. ipcv.md's cost model (issue 7, target 1).

    .venv/bin/python benchmarks/flops.py [--model qwen2-vl-7b-shape] [--tokens 1024 5120 16384]

Counts the FLOPs of the original and the rewritten ExportedProgram with torch.utils.flop_counter
under fake tensors (one segment of N patches), and prints them next to the analytical floor
(`ModelDescription.flop_floor`) and ipcv.md's block-only estimates. Deterministic: no timing.
"""

from __future__ import annotations

import argparse
import time
import warnings

from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.flops import floor_ratio, program_flops
from ipcv_export.models import load_encoder

TOKENS = (1024, 5120, 16384)
RETENTIONS = (0.5, 0.35, 0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2-vl-7b-shape")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS),
                        help="patches per call (packed towers) or per image (batched towers)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    encoder = load_encoder(args.model)
    original = capture(encoder)
    defaults = encoder.method_config()
    print(f"model {args.model}: loaded and captured in {time.perf_counter() - start:.0f} s; "
          f"l_p={defaults.prune_layer}, Delta={defaults.as_depth}, k={defaults.neighbors}")
    print(f"{'rho':>5s} {'N':>6s} {'orig GFLOP':>11s} {'IPCV GFLOP':>11s} {'ratio':>7s} {'floor':>7s} {'ratio/floor':>11s}")
    for retention in RETENTIONS:
        config = encoder.method_config(retention=retention)
        program = compress(original, encoder, config)
        for tokens in args.tokens:
            before = program_flops(original, encoder, tokens)
            after = program_flops(program, encoder, tokens)
            floor = floor_ratio(encoder, config, tokens)
            print(f"{retention:5.2f} {tokens:6d} {before / 1e9:11.1f} {after / 1e9:11.1f} {after / before:7.4f} "
                  f"{floor:7.4f} {after / before / floor:11.4f}")


if __name__ == "__main__":
    main()
