"""IVC-Prune's selection as ivc-prune.md defines it: Python counts, sets and stable sorts.

This is the oracle the static selector and every exported selector graph are tested against.
The two score functions (`ivc_scores`, `visual_attention`) are the method's numerics and are
shared with the selector, so that both rank identical values and only the selection logic differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..tokens import RETENTION_SCALE


def round_half_even(numerator: int, denominator: int) -> int:
    """rhe(numerator / denominator) for non-negative integers, exactly (no floating point)."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (2 * remainder == denominator and quotient % 2):
        quotient += 1
    return quotient


@dataclass(frozen=True)
class Counts:
    """Step 0 of ivc-prune.md: every count is a function of L and rho only."""

    visual: int  # L
    budget: int  # K
    seeds: int  # n_seed
    ivc_per_kind: int  # n_ivc

    @classmethod
    def of(cls, visual: int, retention_e4: int) -> Counts:
        budget = max(1, round_half_even(visual * retention_e4, RETENTION_SCALE))
        seeds = min(budget, max(1, round_half_even(visual, 100)))
        ivc = round_half_even(visual, 10)
        if 2 * ivc + seeds > budget:
            ivc = (budget - seeds) // 2
        return cls(visual, budget, seeds, ivc)


def ivc_scores(positions: torch.Tensor, head_dim: int, rope_theta: float,
               axes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, s), float64 [L]: summed cosines and sines of the rotary frequencies at each token's
    positions (`positions`, [3, L] integers; ivc-prune.md, step 2).

    axes None: every frequency under each of the three axes, added as t + (h + w) so that mirrored
    tokens (r, c) and (c, r) tie exactly (the authors' score, kept for Qwen2-VL and Qwen2.5-VL).
    axes [d/2] (0, 1 or 2 per frequency): the rotation the model's attention applies, frequency j
    turned by the position on axis axes[j] (`rotary_axes` reads it from the model)."""
    exponent = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device) * (-2.0 / head_dim)
    theta = torch.pow(torch.scalar_tensor(rope_theta, dtype=torch.float64), exponent)
    angles = positions.to(torch.float64)[..., None] * theta
    if axes is not None:
        chosen = (axes.to(positions.device) == torch.arange(3, device=positions.device)[:, None]).to(torch.float64)
        turned = (angles * chosen[:, None, :]).sum(0)  # one non-zero term per frequency: exact
        return turned.cos().sum(-1), turned.sin().sum(-1)
    gc, gs = angles.cos().sum(-1), angles.sin().sum(-1)
    return gc[0] + (gc[1] + gc[2]), gs[0] + (gs[1] + gs[2])


def visual_attention(rows: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """A_R, fp32 [R, L]: head-averaged softmax over the L visual tokens of <V_h[r], V_h[i]> / sqrt(d)
    (ivc-prune.md, step 3). rows [R, H, d], visual [L, H, d]."""
    rows, visual = rows.float(), visual.float()
    logits = torch.bmm(rows.transpose(0, 1), visual.permute(1, 2, 0)) / math.sqrt(rows.shape[-1])  # [H, R, L]
    return logits.softmax(-1).mean(0)


def foreground_score(attention_rows: torch.Tensor, row_count: int | torch.Tensor) -> torch.Tensor:
    """f [L]: one mean over the query rows and the seed rows together (ivc-prune.md, step 4).
    `attention_rows` is cat([A_T, A_seed]); rows past the real ones may be zero padding."""
    return attention_rows.sum(0) / row_count


def _top(score: torch.Tensor, count: int) -> set[int]:
    """Indices of the `count` largest values, ties to the lower index (a stable sort)."""
    values = score.tolist()
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return set(order[:count])


def ivc_tokens(positions: torch.Tensor, count: int, head_dim: int, rope_theta: float,
               axes: torch.Tensor | None = None) -> set[int]:
    """IVC_cos | IVC_sin: the `count` best of each score (step 2); a function of positions only."""
    c, s = ivc_scores(positions, head_dim, rope_theta, axes)
    return _top(c, count) | _top(s, count)


def select_reference(positions: torch.Tensor, visual_values: torch.Tensor, query_values: torch.Tensor,
                     retention_e4: int, head_dim: int, rope_theta: float,
                     axes: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices (into the visual span) of the K kept visual tokens.

    positions [3, L]: the span's M-RoPE positions; visual_values [L, H, d]: layer k-1's values of
    the span; query_values [T, H, d]: its values of the query rows [a+L+delta, S); axes: as
    `ivc_scores`.
    """
    counts = Counts.of(positions.shape[1], retention_e4)
    priority = ivc_tokens(positions, counts.ivc_per_kind, head_dim, rope_theta, axes)
    queries = visual_attention(query_values, visual_values)
    seeds = sorted(_top(queries.mean(0), counts.seeds))
    priority |= set(seeds)
    rows = torch.cat([queries, visual_attention(visual_values[seeds], visual_values)])
    f = foreground_score(rows, query_values.shape[0] + counts.seeds)
    f_values = f.tolist()
    rest = sorted((i for i in range(counts.visual) if i not in priority), key=lambda i: (-f_values[i], i))
    kept = priority | set(rest[:counts.budget - len(priority)])
    return torch.tensor(sorted(kept), dtype=torch.int64)
