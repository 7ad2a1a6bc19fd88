"""Parity of an encoder's outputs with the eager reference, with typed failures.

Discrete choices are compared first, exactly: the kept set must be the reference's. Neighbour
sets may differ only where the reference's own distances tie within `NEIGHBOR_RTOL` (two runtimes
compute the states at l_p with different rounding, ~1e-7, so a near tie can resolve either way);
any other difference fails. The embeddings are then compared with the reference run on the
file's neighbour choice, so that value tolerances measure numerics, not tie-breaking.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from .config import IpcvConfig
from .inputs import real_patches
from .models.description import ModelDescription, PaddedParts, TowerParts
from .reference import ReferenceResult, batched_reference, ipcv_reference, mixed_reference, padded_reference

NEIGHBOR_RTOL = 1e-5


class ParityError(ValueError):
    """An exported file disagrees with the reference; the message names the grid and the worst diff."""


@dataclass(frozen=True)
class Tolerance:
    """How close a file must be. fp32 files must make the reference's discrete choices and match
    its values to `atol`. Reduced-precision files compute scores from rounded states, so their kept
    set may differ near the threshold: their values are compared with the fp32 reference run on
    their own choices, to `rtol` times the largest reference value."""

    atol: float = 0.0
    rtol: float = 0.0
    exact_selection: bool = True

    def limit(self, reference: torch.Tensor) -> float:
        scale = reference.abs().max().item() if reference.numel() else 0.0
        return self.atol + self.rtol * scale


TOLERANCES = {"fp32": Tolerance(atol=1e-4), "fp16": Tolerance(rtol=1e-2, exact_selection=False),
              "bf16": Tolerance(rtol=4e-2, exact_selection=False)}


@dataclass
class ParityCheck:
    grid: list  # grid_thw rows (packed towers) or the image batch's shape [B, C, H, W]
    max_abs_diff: float
    limit: float
    tied_neighbor_rows: int
    kept_agreement: float  # fraction of the reference's kept tokens the file kept too


def check_parity(run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]], visual: torch.nn.Module,
                 config: IpcvConfig, grid_thw: torch.Tensor, pixel_values: torch.Tensor,
                 tolerance: Tolerance = TOLERANCES["fp32"], description: ModelDescription | None = None) -> ParityCheck:
    """Run `run(pixel_values, grid_thw) -> (embeddings, kept_index, neighbor_index)` and compare
    with the reference of the tower `description` describes (None: a plain Qwen2-VL-style tower)."""
    reference_of = partial(ipcv_reference, visual, pixel_values, grid_thw, config, description=description)
    return _check(run(pixel_values, grid_thw), reference_of, tolerance, grid_thw.tolist())


def check_batched_parity(run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], parts: TowerParts,
                         special_tokens: int, config: IpcvConfig, pixel_values: torch.Tensor,
                         tolerance: Tolerance = TOLERANCES["fp32"], across_images: bool = False) -> ParityCheck:
    """The same checks for a tower that batches whole images: `run(pixel_values [B, C, H, W])`
    gives per-image kept and neighbour indices, compared image by image."""
    reference_of = partial(batched_reference, parts, special_tokens, pixel_values, config, across_images=across_images)
    return _check(run(pixel_values), reference_of, tolerance, list(pixel_values.shape))


def check_mixed_parity(run: Callable[[torch.Tensor], tuple[torch.Tensor, ...]], parts: TowerParts,
                       special_tokens: int, config: IpcvConfig, pixel_values: torch.Tensor,
                       tolerance: Tolerance = TOLERANCES["fp32"]) -> ParityCheck:
    """The same checks for mixed-resolution tokens, against `mixed_reference`: the tokens computed
    in full and the cell each other patch was rebuilt from, image by image."""
    reference_of = partial(mixed_reference, parts, special_tokens, pixel_values, config.retention, cell=config.mixed_cell)
    return _check(run(pixel_values), reference_of, tolerance, list(pixel_values.shape))


def check_padded_parity(run: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]], parts: PaddedParts,
                        config: IpcvConfig, pixel_values: torch.Tensor, position_ids: torch.Tensor,
                        tolerance: Tolerance = TOLERANCES["fp32"]) -> ParityCheck:
    """The same checks for a padded tower: `run(pixel_values [B, P, w], image_position_ids [B, P, 2])`
    against `padded_reference`, image by image; the check's grid records each image's real patches
    and the padded length."""
    reference_of = partial(padded_reference, parts, pixel_values, position_ids, config)
    real = real_patches(position_ids).sum(-1).tolist()
    return _check(run(pixel_values, position_ids), reference_of, tolerance, [real, pixel_values.shape[1]])


def _check(outputs: tuple, reference_of: Callable[..., ReferenceResult], tolerance: Tolerance, grid: list) -> ParityCheck:
    *features, kept, neighbors = (torch.as_tensor(t).cpu() for t in outputs)
    features = [feature.float() for feature in features]
    reference = reference_of()
    kept = kept.long().sort(-1).values
    k_prime = reference.neighbors.shape[-1]
    neighbors = neighbors[..., :k_prime].long()
    missing = _missing(reference.keep, kept)
    agreement = 1.0 - missing / reference.keep.numel() if reference.keep.numel() else 1.0
    if not tolerance.exact_selection:
        reference = reference_of(neighbors=neighbors, keep=kept)
        return _compare_values(grid, features, reference, tolerance, 0, agreement)
    if not torch.equal(kept, reference.keep):
        raise ParityError(f"grid {grid}: kept set differs from the reference in {missing} of {reference.keep.numel()} tokens")
    if neighbors.shape != reference.neighbors.shape:
        raise ParityError(f"neighbour index shape {list(neighbors.shape)} != reference {list(reference.neighbors.shape)}")
    tied = _tied_rows(neighbors.reshape(-1, k_prime), reference.neighbors.reshape(-1, k_prime),
                      reference.distances.reshape(-1, reference.distances.shape[-1]))
    if len(tied):
        reference = reference_of(neighbors=neighbors)
    return _compare_values(grid, features, reference, tolerance, len(tied), agreement)


def _compare_values(grid, features: list[torch.Tensor], reference, tolerance: Tolerance, tied: int,
                    agreement: float) -> ParityCheck:
    """Every feature output (the embeddings, then each tap's) within its limit; the check records
    the output closest to its limit."""
    expected = [reference.embeddings, *reference.taps]
    if len(features) != len(expected):
        raise ParityError(f"grid {grid}: the file returned {len(features)} feature outputs, the reference {len(expected)}")
    worst = None
    for index, (actual, wanted) in enumerate(zip(features, expected)):
        name = "output" if index == 0 else f"tap {index - 1} output"
        if actual.shape != wanted.shape:
            raise ParityError(f"grid {grid}: {name} shape {list(actual.shape)} != reference {list(wanted.shape)}")
        diff = (actual - wanted).abs().max().item() if actual.numel() else 0.0
        limit = tolerance.limit(wanted)
        if not diff <= limit:
            raise ParityError(f"grid {grid}: {name}: max abs diff {diff:.3g} > {limit:.3g} against the eager reference")
        if worst is None or diff - limit > worst[0] - worst[1]:
            worst = diff, limit
    return ParityCheck(grid, *worst, tied, agreement)


def _missing(reference_keep: torch.Tensor, kept: torch.Tensor) -> int:
    """How many of the reference's kept tokens the file did not keep, image by image (all of them
    when the file kept a different number per image or of images)."""
    if kept.shape != reference_keep.shape:
        return reference_keep.numel()
    rows = zip(reference_keep.reshape(-1, reference_keep.shape[-1]), kept.reshape(-1, kept.shape[-1]))
    return sum(int((~torch.isin(theirs, ours)).sum()) for theirs, ours in rows)


def _tied_rows(neighbors: torch.Tensor, reference: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Rows whose neighbour set differs from the reference's but only among tied distances."""
    same = (neighbors.sort(-1).values == reference.sort(-1).values).all(-1)
    rows = (~same).nonzero().flatten()
    if len(rows) == 0:
        return rows
    chosen = distances[rows].gather(1, neighbors[rows])
    kth = distances[rows].gather(1, reference[rows]).max(-1, keepdim=True).values
    distinct = (neighbors[rows].sort(-1).values.diff(dim=-1) != 0).all(-1)
    if not ((chosen <= kth * (1 + NEIGHBOR_RTOL)).all(-1) & distinct).all():
        raise ParityError(f"{len(rows)} removed tokens have neighbours that are not among their nearest kept tokens")
    return rows
