"""The token-level mathematics of IPCV as pure tensor functions.

Graph passes insert calls to these functions; re-exporting the rewritten module traces them into
the graph. They are written for deployment: shapes follow from N alone, no TopK or sort with a K
that grows with N (TensorRT caps TopK at 3840), no NonZero, and every result is exact.

Shapes: N tokens, K kept, R = N - K removed, D channels, k' = min(neighbors, K).
"""

from __future__ import annotations

import torch

RETENTION_SCALE = 10_000
"""Retention is fixed to 4 decimals: K = (N * round(rho * 1e4)) // 1e4 (ipcv.md, step 1)."""

BISECTION_STEPS = 96
"""Steps of the threshold search. While the interval [lo, hi] spans more than 2^16 the step tries
hi * 2^-16 (at most ~18 such steps cover the fp32 range), then it halves (~40 steps reach one ulp):
96 leaves a margin, and the search is exact for every finite non-negative fp32 score."""


def kept_count(n: int | torch.SymInt, retention_e4: int) -> int | torch.SymInt:
    """K = (N * retention_e4) // 10^4, in integer arithmetic (ipcv.md, step 1).

    ipcv.md clamps K to [1, N]; the upper clamp never binds for retention <= 1, and the lower one
    is kept out of the graph (a piecewise size defeats symbolic shape reasoning): an exported file
    instead accepts only N >= `min_tokens(retention_e4)`, where K >= 1 holds without it.
    """
    return (n * retention_e4) // RETENTION_SCALE


def min_tokens(retention_e4: int) -> int:
    """Smallest N for which K = (N * retention_e4) // 10^4 is at least 1."""
    return -(-RETENTION_SCALE // retention_e4)


def importance_score(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[N] fp32 squared change of each token across one block: ||after_i - before_i||^2."""
    delta = after.float() - before.float()
    return (delta * delta).sum(-1)


def kth_largest(score: torch.Tensor, k: int | torch.SymInt) -> torch.Tensor:
    """The K-th largest value of a non-negative [N] score, found by bisection on its value.

    Each step counts the scores at or above a candidate: O(N) work and memory, no sort.
    The invariant count(score >= lo) >= K holds throughout, so the answer is the smallest
    score at or above the final lower bound.
    """
    k_t = torch.scalar_tensor(k, dtype=torch.int64, device=score.device)
    lo = torch.zeros((), dtype=score.dtype, device=score.device)
    hi = score.max() * 2 + torch.finfo(score.dtype).tiny
    for _ in range(BISECTION_STEPS):
        geometric = hi * 2.0**-16
        mid = torch.where(lo < geometric, geometric, lo + (hi - lo) * 0.5)
        enough = (score >= mid).sum() >= k_t
        lo = torch.where(enough, mid, lo)
        hi = torch.where(enough, hi, mid)
    inf = torch.full_like(score, float("inf"))
    return torch.where(score >= lo, score, inf).min()


def select_tokens(score: torch.Tensor, k: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-K of `score` with ties to the lower index, as (keep [K], rem [R], slot [N]).

    keep and rem are ascending token indices; slot[i] is token i's row in cat([kept, removed]),
    so `cat([kept_rows, removed_rows])[slot]` puts every token back in its original place.
    """
    n = score.shape[0]
    k_t = torch.scalar_tensor(k, dtype=torch.int64, device=score.device)
    keep_mask = best_mask(score, kth_largest(score, k), k_t)
    kept_before = count_up_to(keep_mask) - 1
    removed_before = count_up_to(~keep_mask) - 1
    slot = torch.where(keep_mask, kept_before, removed_before + k_t)
    order = torch.zeros_like(slot).scatter(0, slot, torch.arange(n, device=score.device))
    return order[:k], order[k:], slot


def best_mask(score: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Membership mask of the `count` best of `score`, given the count-th best value `threshold`:
    everything above it, then the tied values in index order (ties go to the lower index)."""
    above = score > threshold
    tied = score == threshold
    return above | (tied & (count_up_to(tied) <= count - above.sum()))


def count_up_to(mask: torch.Tensor) -> torch.Tensor:
    """int64 running count of True values. The sum runs in fp32 (exact below 2^24 tokens) because
    TensorRT's CumSum accepts only floating-point inputs."""
    return torch.cumsum(mask.to(torch.float32), 0).to(torch.int64)


NEIGHBOR_CHUNKS = 8
"""The neighbour search handles the removed tokens in this many slices, one after the other, so
its largest intermediate is [R / 8, K] distances: 0.5 GB at N = 65536, rho = 0.5."""


def nearest_kept(kept: torch.Tensor, removed: torch.Tensor, neighbors: int) -> torch.Tensor:
    """[R, k] indices into `kept` ([K, D]) of each removed token's nearest kept tokens (fp32 L2).

    When K < k only the first K columns are real neighbours; the others hold the index K, one past
    the end, which `reconstruct` ignores. Padding keeps k static instead of min(k, K).
    """
    kept = kept.float()
    kept_norms = (kept * kept).sum(-1)[None, :]
    return torch.cat([_nearest(kept, kept_norms, chunk.float(), neighbors) for chunk in row_chunks(removed, NEIGHBOR_CHUNKS)])


def row_chunks(x: torch.Tensor, chunks: int, dim: int = 0) -> list[torch.Tensor]:
    """`chunks` consecutive slices of x along `dim`, sizes differing by at most one (some may be
    empty). Bounds are i * n // chunks, so a symbolic n needs no guard on its divisibility."""
    n = x.shape[dim]
    bounds = [i * n // chunks for i in range(chunks + 1)]
    return [x.narrow(dim, start, stop - start) for start, stop in zip(bounds, bounds[1:])]


def _nearest(kept: torch.Tensor, kept_norms: torch.Tensor, removed: torch.Tensor, neighbors: int) -> torch.Tensor:
    dist = (removed * removed).sum(-1, keepdim=True) - 2 * removed @ kept.T + kept_norms
    padding = torch.full((dist.shape[0], neighbors), float("inf"), device=dist.device)
    index = torch.topk(torch.cat([dist, padding], 1), neighbors, dim=-1, largest=False, sorted=True).indices
    return torch.minimum(index, torch.scalar_tensor(kept.shape[0], dtype=index.dtype, device=index.device))


def reconstruct(kept_now: torch.Tensor, kept_then: torch.Tensor, removed_then: torch.Tensor,
                neighbor_index: torch.Tensor) -> torch.Tensor:
    """NGR: removed_then + mean over neighbours of (kept_now - kept_then), shape [R, D].

    Index K in `neighbor_index` is padding (see `nearest_kept`): it reads a zero row and is not counted.
    """
    drift = kept_now - kept_then
    drift = torch.cat([drift, torch.zeros_like(drift[:1])], 0)
    r, k = neighbor_index.shape
    gathered = drift.index_select(0, neighbor_index.reshape(-1)).reshape(r, k, drift.shape[-1])
    count = (neighbor_index < kept_now.shape[0]).sum(-1, keepdim=True).to(drift.dtype)
    return removed_then + gathered.sum(1) / count


def scatter_back(kept_rows: torch.Tensor, removed_rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[N, D] sequence in original order from kept rows ([K, D]) and removed rows ([R, D])."""
    return torch.cat([kept_rows, removed_rows], 0).index_select(0, slot)


def project_except_queries(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                           rem: torch.Tensor, slot: torch.Tensor, columns: tuple[int, int]) -> torch.Tensor:
    """linear(x, weight, bias) [N, F] with output columns [start, stop) (the queries) computed for
    kept rows only; removed rows hold zeros there, which nothing reads (an AS block's attention
    takes queries from kept rows only). Saves (N - K) * (stop - start) * in_features MACs."""
    start, stop = columns
    kept = torch.nn.functional.linear(x.index_select(0, keep), weight, bias)
    other_weight = torch.cat([weight[:start], weight[stop:]])
    other_bias = None if bias is None else torch.cat([bias[:start], bias[stop:]])
    other = torch.nn.functional.linear(x.index_select(0, rem), other_weight, other_bias)
    removed = torch.cat([other[:, :start], other.new_zeros(other.shape[0], stop - start), other[:, start:]], 1)
    return scatter_back(kept, removed, slot)


def no_selection(tokens_in: torch.Tensor, neighbors: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection outputs when nothing is pruned (rho = 1): keep = 0..N-1, no neighbours."""
    n = tokens_in.shape[0]
    return torch.arange(n, device=tokens_in.device), torch.zeros((0, neighbors), dtype=torch.int64, device=tokens_in.device)
