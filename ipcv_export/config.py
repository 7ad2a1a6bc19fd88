"""IPCV hyper-parameters (ipcv.md, notation) and their checks."""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import RETENTION_SCALE


class UsageError(ValueError):
    """A user-supplied value is out of range or unusable; the message is one line naming it."""


@dataclass(frozen=True)
class IpcvConfig:
    """retention rho in (0, 1]; prune_layer l_p >= 1; as_depth Delta >= 0; neighbors k >= 1."""

    retention: float = 0.5
    prune_layer: int = 3
    as_depth: int = 7
    neighbors: int = 10

    @property
    def retention_e4(self) -> int:
        """rho to 4 decimals as an integer: K = (N * retention_e4) // 10^4."""
        return round(self.retention * RETENTION_SCALE)

    def check(self, depth: int) -> "IpcvConfig":
        """Raise UsageError for a value outside its range for an encoder of `depth` blocks."""
        if not isinstance(self.retention, (int, float)) or not 0 < self.retention <= 1:
            raise UsageError(f"retention must be in (0, 1], got {self.retention!r}")
        if self.retention_e4 < 1:
            raise UsageError(f"retention must be at least 0.0001 (4 decimals are kept), got {self.retention!r}")
        if not 1 <= self.prune_layer < depth:
            raise UsageError(f"prune layer must be in [1, {depth - 1}] for this {depth}-block encoder, got {self.prune_layer}")
        if self.as_depth < 0:
            raise UsageError(f"AS depth must be >= 0, got {self.as_depth}")
        if self.neighbors < 1:
            raise UsageError(f"neighbors must be >= 1, got {self.neighbors}")
        return self
