"""IVC-Prune's selection with static shapes, for export (ivc-prune.md steps 0 and 2-5).

Same kept set as `selection_reference`, written for graphs: the counts are tensor arithmetic on L,
each set is a membership mask, and every ranking is exact with ties to the lower index without a
TopK whose K grows past L/10 + 1 (TensorRT caps TopK at 3840; L/10 + 1 <= 1639 for L <= 16384).
The only output whose size depends on the counts is the keep vector, of length K, a function of L.
"""

from __future__ import annotations

import torch

from ..tokens import RETENTION_SCALE, best_mask, count_up_to, select_tokens
from .selection_reference import foreground_score, ivc_scores, visual_attention

TOPK_LIMIT = 3840
"""TensorRT's largest TopK K; the selector's TopKs stay below it for L <= 16384."""
PRIORITY_KEY = 2.0
"""Ranking key of the priority set: above every foreground score, which is a mean of softmax
probabilities and so at most 1."""


def round_half_even(numerator, denominator: int):
    """rhe(numerator / denominator) for a non-negative int, SymInt or int64 tensor numerator."""
    doubled = 2 * numerator + denominator
    rounded = doubled // (2 * denominator)
    remainder = doubled % (2 * denominator)
    if isinstance(numerator, torch.Tensor):
        return rounded - (remainder == 0).to(rounded.dtype) * (rounded % 2)
    return rounded - (1 - torch.sym_min(1, remainder)) * (rounded % 2)


def kept_visual_count(visual, retention_e4: int):
    """K = max(1, rhe(L * rho)) as an int or SymInt: the length of the keep vector."""
    return torch.sym_max(1, round_half_even(visual * retention_e4, RETENTION_SCALE))


def _counts(visual: int, retention_e4: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(K, n_seed, n_ivc) as int64 scalars (ivc-prune.md, step 0)."""
    length = torch.scalar_tensor(visual, dtype=torch.int64, device=device)
    budget = torch.clamp(round_half_even(length * retention_e4, RETENTION_SCALE), min=1)
    seeds = torch.minimum(budget, torch.clamp(round_half_even(length, 100), min=1))
    ivc = torch.minimum(round_half_even(length, 10), torch.div(budget - seeds, 2, rounding_mode="floor"))
    return budget, seeds, ivc


def _top_mask(score: torch.Tensor, count: torch.Tensor, bound: int) -> torch.Tensor:
    """Membership mask of the `count` best of `score` (ties to the lower index); count <= bound.

    TopK gives only the threshold value, which is exact whatever order it returns ties in; the
    ties at the threshold are then admitted in index order until the count is reached.
    """
    values = torch.topk(score, bound, sorted=True).values
    threshold = values.index_select(0, torch.clamp(count - 1, min=0).reshape(1))
    return best_mask(score, threshold, count) & (count > 0)


def _first_members(mask: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices of the first `bound` members of `mask` in ascending order, and which of the
    `bound` slots are real: a static-size stand-in for nonzero() when at most `bound` are set."""
    rank = count_up_to(mask) - 1
    slot = torch.where(mask & (rank < bound), rank, bound)
    arange = torch.arange(mask.shape[0], device=mask.device)
    index = torch.zeros(bound + 1, dtype=torch.int64, device=mask.device).scatter(0, slot, arange)
    return index[:bound], torch.arange(bound, device=mask.device) < mask.sum()


def select_static(positions: torch.Tensor, visual_values: torch.Tensor, query_values: torch.Tensor,
                  retention_e4: int, head_dim: int, rope_theta: float,
                  axes: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices of the K kept visual tokens; arguments as `select_reference`."""
    visual = positions.shape[1]
    budget, seed_count, ivc_count = _counts(visual, retention_e4, positions.device)
    ivc_bound, seed_bound = visual // 10 + 1, visual // 100 + 1  # static upper bounds of the counts

    c, s = ivc_scores(positions, head_dim, rope_theta, axes)
    priority = _top_mask(c, ivc_count, ivc_bound) | _top_mask(s, ivc_count, ivc_bound)
    queries = visual_attention(query_values, visual_values)
    seeds = _top_mask(queries.mean(0), seed_count, seed_bound)
    priority = priority | seeds

    seed_index, seed_real = _first_members(seeds, seed_bound)
    seed_rows = visual_attention(visual_values.index_select(0, seed_index), visual_values)
    rows = torch.cat([queries, seed_rows * seed_real[:, None].to(seed_rows.dtype)])
    f = foreground_score(rows, query_values.shape[0] + seed_count)
    key = torch.where(priority, torch.full_like(f, PRIORITY_KEY), f)
    kept, _, _ = select_tokens(key, kept_visual_count(visual, retention_e4))
    return kept


class SelectorModule(torch.nn.Module):
    """`select_static` with its settings fixed: (positions, visual_values, query_values) -> kept."""

    def __init__(self, retention_e4: int, head_dim: int, rope_theta: float, axes: torch.Tensor | None = None) -> None:
        super().__init__()
        self.retention_e4, self.head_dim, self.rope_theta, self.axes = retention_e4, head_dim, rope_theta, axes

    def forward(self, positions: torch.Tensor, visual_values: torch.Tensor, query_values: torch.Tensor) -> torch.Tensor:
        return select_static(positions, visual_values, query_values, self.retention_e4, self.head_dim, self.rope_theta,
                             self.axes)


def export_selector(retention_e4: int, head_dim: int, rope_theta: float, kv_heads: int = 2,
                    axes: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """The selector as an ExportedProgram with L and T dynamic, for runtimes without Python
    (`torch.onnx.export(program, dynamo=True)` turns it into ONNX; see tests/llm/test_selection.py)."""
    from torch.fx.experimental import _config as fx_config

    generator = torch.Generator().manual_seed(0)
    example = (torch.randint(0, 64, (3, 300)), torch.randn(300, kv_heads, head_dim, generator=generator),
               torch.randn(9, kv_heads, head_dim, generator=generator))
    dynamic = torch.export.Dim.DYNAMIC
    with fx_config.patch(backed_size_oblivious=True):
        return torch.export.export(SelectorModule(retention_e4, head_dim, rope_theta, axes), example,
                                   dynamic_shapes=({1: dynamic}, {0: dynamic}, {0: dynamic}))

