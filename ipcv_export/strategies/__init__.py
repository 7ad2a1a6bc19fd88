"""Strategies: how a file computes fewer tokens than the stock tower, one module each: `pruning`
(IPCV inside the tower, ipcv.md) and `mixed` (mixed-resolution tokens from the first block on).
The configuration's selection picks one (`strategy_of`); the pipeline, compress and the parity
gate ask it and never test which one it is."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Strategy
from .mixed import MIXED
from .pruning import PRUNING

if TYPE_CHECKING:
    from ..config import IpcvConfig


def strategy_of(config: IpcvConfig) -> Strategy:
    """Mixed-resolution tokens for `selection="mixed"`, IPCV's pruning for every other selection."""
    return MIXED if config.selection == "mixed" else PRUNING
