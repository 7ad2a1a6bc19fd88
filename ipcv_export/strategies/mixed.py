"""Mixed-resolution tokens (`--selection mixed`, mixed_resolution.py): nothing is pruned inside the
tower; its blocks run from the first on on the c^2 patch tokens of each detailed c x c cell and
(c - 1)^2 tokens of the image shrunk by (c - 1) / c for every other cell. Towers that batch whole
images only (passes.check_supported)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..capture import export_symbolic
from ..contract import output_names
from ..mixed_resolution import ExportableMixedResolution, min_grid_side
from ..models import attention
from ..tokens import min_side
from ..verify import check_mixed_parity
from .base import Strategy

if TYPE_CHECKING:
    from ..config import IpcvConfig
    from ..layouts.base import Call, Layout
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance

VERIFY_MIXED = ((1, 16, 16), (2, 12, 18), (3, 11, 13))
"""(images, rows, columns of patches) per check: sides with every remainder modulo each cell side
(patches outside every cell), each side raised to the file's smallest and rounded up to the grid
multiple."""


class Mixed(Strategy):
    def min_patches(self, config: IpcvConfig) -> int:
        """A square grid with at least one fine cell (`mixed_resolution.min_grid_side`)."""
        return min_grid_side(config.retention_e4, config.mixed_cell) ** 2

    def default_min_patches(self, config: IpcvConfig) -> int:
        return self.min_patches(config)

    def compress(self, program: torch.export.ExportedProgram, encoder: LoadedEncoder,
                 config: IpcvConfig) -> torch.export.ExportedProgram:
        """No pass runs: the tokens change before the first block, so the tower is captured again
        from its stock parts with them (`mixed_resolution.ExportableMixedResolution`)."""
        batch = encoder.description.image_batch
        module = ExportableMixedResolution(encoder.module, batch.parts, batch.special_tokens, config.retention_e4,
                                           config.mixed_cell).eval()
        with attention.batched_whole_queries(encoder.module):
            return export_symbolic(module, encoder, self.min_patches(config))

    def describe(self, config: IpcvConfig) -> str:
        return (f"rho={config.retention}, selection=mixed (mixed-resolution tokens, "
                f"{config.mixed_cell} x {config.mixed_cell} cells)")

    def manifest_io(self, layout: Layout, encoder: LoadedEncoder, config: IpcvConfig,
                    smallest: int) -> tuple[dict, list[dict]]:
        """The layout's inputs and features; the diagnostics say which patches were computed in full."""
        inputs, outputs = layout.manifest_io(encoder, config, smallest)
        return inputs, [outputs[0], *_diagnostics(encoder.special_tokens, config.retention_e4, config.mixed_cell)]

    def verification_calls(self, layout: Layout, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        multiple, side, p = encoder.merge_size, min_side(smallest, encoder.merge_size), encoder.patch_size
        fit = lambda patches: -(-max(patches, side) // multiple) * multiple  # noqa: E731
        return [(torch.randn(images, encoder.channels, fit(rows) * p, fit(cols) * p, generator=generator),)
                for images, rows, cols in VERIFY_MIXED]

    def check_call(self, layout: Layout, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder,
                   config: IpcvConfig, call: Call, tolerance: Tolerance) -> ParityCheck:
        batch = encoder.description.image_batch
        return check_mixed_parity(run, batch.parts(encoder.module), batch.special_tokens, config, call[0], tolerance)


def _diagnostics(special_tokens: int, retention_e4: int, cell: int) -> list[dict]:
    """The diagnostic outputs of a mixed-selection file (`mixed_resolution.selection_outputs`)."""
    names = output_names()
    square, coarse = cell * cell, (cell - 1) ** 2
    fine = (f"F = C*{square * retention_e4 - coarse * 10_000}//{(square - coarse) * 10_000} of the "
            f"C = (H/p//{cell})*(W/p//{cell}) cells of {cell} x {cell} patches")
    return [{"name": names[1], "dtype": "int64", "shape": ["B", f"{special_tokens} + {square}F + X"],
             "meaning": f"per image, ascending indices of the tokens computed at full resolution: the special tokens, "
                        f"the patches of the {fine}, and the X patches outside every cell (the last rows and "
                        f"columns beyond a multiple of {cell})"},
            {"name": names[2], "dtype": "int64", "shape": ["B", f"P-{square}F-X", 1],
             "meaning": f"per image, for each other patch (ascending), the cell (raster order) whose {coarse} token(s) "
                        f"of the image shrunk by {cell - 1}/{cell} it was rebuilt from"}]


MIXED = Mixed()
