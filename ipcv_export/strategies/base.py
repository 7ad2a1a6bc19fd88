"""What every strategy provides: how a file for a configuration computes fewer tokens, and how it
is checked. The pipeline asks the configuration's strategy (`strategy_of`); a strategy asks the
encoder's layout for what does not depend on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import IpcvConfig
    from ..layouts.base import Call, Layout
    from ..models.encoder import LoadedEncoder
    from ..verify import ParityCheck, Tolerance


class Strategy(ABC):
    """One way to spend fewer FLOPs than the stock tower."""

    @abstractmethod
    def min_patches(self, config: IpcvConfig) -> int:
        """The fewest patches (per call; per image of a tower that batches them) a file takes."""

    def default_min_patches(self, config: IpcvConfig) -> int:
        """The least the profile's smallest N defaults to, beyond ShapeProfile's own (0: no more)."""
        return 0

    @abstractmethod
    def compress(self, program: torch.export.ExportedProgram, encoder: LoadedEncoder,
                 config: IpcvConfig) -> torch.export.ExportedProgram:
        """The captured stock program -> the program the file runs, N still dynamic, its kept and
        neighbour indices as its last two outputs."""

    @abstractmethod
    def describe(self, config: IpcvConfig) -> str:
        """The configuration in one line, as the budget's choice reports it."""

    def as_run(self, config: IpcvConfig, depth: int, report: Callable[[str], None]) -> IpcvConfig:
        """The configuration the file will run for a tower of `depth` blocks (as the manifest records it)."""
        return config

    def manifest_io(self, layout: Layout, encoder: LoadedEncoder, config: IpcvConfig,
                    smallest: int) -> tuple[dict, list[dict]]:
        return layout.manifest_io(encoder, config, smallest)

    def verification_calls(self, layout: Layout, encoder: LoadedEncoder, config: IpcvConfig, smallest: int,
                           generator: torch.Generator) -> list[Call]:
        return layout.verification_calls(encoder, config, smallest, generator)

    def check_call(self, layout: Layout, run: Callable[..., tuple[torch.Tensor, ...]], encoder: LoadedEncoder,
                   config: IpcvConfig, call: Call, tolerance: Tolerance) -> ParityCheck:
        return layout.check_call(run, encoder, config, call, tolerance)
