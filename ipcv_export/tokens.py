"""The token-level mathematics of IPCV as pure tensor functions.

Graph passes insert calls to these functions; re-exporting the rewritten module traces them into
the graph. They are written for deployment: shapes follow from N alone, no TopK or sort with a K
that grows with N (TensorRT caps TopK at 3840), no NonZero, and every result is exact.

Shapes: N tokens, K kept, R = N - K removed, D channels, k' = min(neighbors, K). Every function
takes either one packed sequence ([N, D] states, [N] scores, [K] indices: the selection runs over
the whole call) or a batch of equal-length sequences ([B, N, D], [B, N], [B, K]: one selection per
batch entry, e.g. per image of a CLIP-style tower). Tokens are always on the second-to-last axis
of states and the last axis of scores and indices.
"""

from __future__ import annotations

import math

import torch

from .config import RETENTION_SCALE

SEARCH_CANDIDATES = 16
"""Values each step of the K-th-value search tries at once (see `_search`): 8 steps instead of the
~60 a plain bisection needs, so the graph holds 8 small [16, N] comparisons rather than 96 steps of
[N] ones (each step is ~10 nodes, and the exporter's time grows with the node count)."""

_SMALLEST_NORMAL = 2.0**-126
_LARGEST_BINADE = 2.0**126
_EXPONENT_START = torch.tensor([0.0] + [2.0 ** (-126 + 16 * j) for j in range(SEARCH_CANDIDATES)])
_EXPONENT_REFINE = torch.tensor([2.0**j for j in range(SEARCH_CANDIDATES)])
_MANTISSA_STEPS = (*[(2.0 ** (-4 * i), SEARCH_CANDIDATES) for i in range(1, 6)], (2.0**-23, 8))
"""(spacing relative to the binade's base b, candidates) of each mantissa step: b/16, ..., b/2^20,
then 8 steps of one ulp (b/2^23), which cover the last 2^-20 b exactly."""


def kept_count(n: int | torch.SymInt, retention_e4: int, special_tokens: int = 0) -> int | torch.SymInt:
    """K = (N * retention_e4) // 10^4, in integer arithmetic (ipcv.md, step 1); with special
    tokens (CLS), K = ((N - S) * retention_e4) // 10^4 patch tokens besides them.

    ipcv.md clamps K to [1, N]; the upper clamp never binds for retention <= 1, and the lower one
    is kept out of the graph (a piecewise size defeats symbolic shape reasoning): an exported file
    instead accepts only N >= `min_tokens(retention_e4)`, where K >= 1 holds without it.
    """
    return ((n - special_tokens) * retention_e4) // RETENTION_SCALE


def fine_cells(cells: int | torch.SymInt, retention_e4: int, cell: int = 2) -> int | torch.SymInt:
    """Mixed-resolution tokens' F fine cells of C cells of c x c patches (c = `cell`;
    mixed_resolution.py), so that about rho * N patch tokens enter the blocks (c^2 per fine cell,
    (c - 1)^2 per coarse one): F = C (c^2 rho - (c - 1)^2) // (2c - 1), C (4 rho - 1) // 3 for c = 2.
    Negative (no fine cell) at rho <= ((c - 1) / c)^2."""
    coarse = (cell - 1) ** 2
    return cells * (cell * cell * retention_e4 - coarse * RETENTION_SCALE) // ((cell * cell - coarse) * RETENTION_SCALE)


def area_weights(cell: int) -> list[list[float]]:
    """[c - 1][c]: each of c - 1 samples as the area-weighted mean of the c samples spanning the
    same length (c = 2: the mean of two); how mixed-resolution tokens shrink a c x c cell."""
    return [[max(0.0, min((out + 1) * cell / (cell - 1), sample + 1) - max(out * cell / (cell - 1), sample))
             * (cell - 1) / cell for sample in range(cell)] for out in range(cell - 1)]


def min_tokens(retention_e4: int) -> int:
    """Smallest N for which K = (N * retention_e4) // 10^4 is at least 1."""
    return -(-RETENTION_SCALE // retention_e4)


def min_side(smallest: int, multiple: int = 1) -> int:
    """Smallest number of patches per image side a batched tower's file accepts, for a file that
    needs `smallest` (= min_tokens) patches per image: at least 2 (sizes of 1 would be specialised
    by the exporter), a square of it holds `smallest` patches, and it is a multiple of `multiple`
    (the tower's grid multiple)."""
    side = max(2, math.isqrt(smallest - 1) + 1)
    return -(-side // multiple) * multiple


SCORE_CEILING = 2.0**125
"""Largest score the selection ranks: the threshold search starts at twice the maximum score (and
hybrid selection lifts its base to that), which must stay a finite fp32."""


def rankable(score: torch.Tensor) -> torch.Tensor:
    """`score` as the selection ranks it, a total order for every input: NaN counts as 0 (the least
    important), anything above SCORE_CEILING (+inf included) as SCORE_CEILING, and ties go to the
    lower index as always. Without it one NaN or inf pixel would leave the counting with fewer or
    more than K winners, i.e. out-of-range scatter indices (memory corruption on TensorRT).
    NaN is found as x != x (Equal, Where, Clip: no IsNaN needed)."""
    return torch.where(score == score, score, torch.zeros_like(score)).clamp(0.0, SCORE_CEILING)


def importance_score(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """[..., N] fp32 squared change of each token across one block: ||after_i - before_i||^2,
    made `rankable`."""
    delta = after.float() - before.float()
    return rankable((delta * delta).sum(-1))


def kth_largest(score: torch.Tensor, k: int | torch.SymInt | torch.Tensor) -> torch.Tensor:
    """The K-th largest value of each row of a [..., N] score ([..., 1]); see `_search`."""
    k_t = k if isinstance(k, torch.Tensor) else torch.scalar_tensor(k, dtype=torch.int64, device=score.device)
    return _search(score, k_t, lambda at_least: at_least.sum(-1, keepdim=True))


def _search(score: torch.Tensor, wanted: torch.Tensor, count) -> torch.Tensor:
    """The largest fp32 value v with count(score >= v) >= wanted: the wanted-th largest score
    when scores are in [0, 2^127) (`rankable` scores, and `hybrid_score`'s lift; negative scores
    count as below all). `count` sums a [..., C, N] mask over each row ([..., C, 1]) or over each
    token's segment ([C, N]); the result has the shape of one candidate slice ([..., 1] or [N]).

    Exact in fp32 arithmetic, no sort: a radix search over the float's own layout, 16 candidates a
    step, each step keeping the largest candidate whose count is still enough. Two steps find the
    binade [b, 2b) (powers of two, or 0 for a subnormal value, whose spacing is that of the lowest
    binade), six find the mantissa (b + j * b / 16^i, then ulps). Every candidate is an exact fp32
    value and they ascend, so "enough" holds for a prefix of them and its length picks the step's
    value; after the last step the interval holds one float, the answer. O(N) memory per step."""
    def step(candidates: torch.Tensor) -> torch.Tensor:  # [..., C, L] ascending -> index of the last enough
        enough = count(score.unsqueeze(-2) >= candidates) >= wanted
        # counted in fp32 (exact: C <= 16): OpenVINO's CPU plugin (2026.4.1) gets an integer ReduceSum
        # over a leading axis followed by arithmetic wrong past the first row of a batch
        return enough.to(score.dtype).sum(-2).to(torch.int64) - 1

    start = _EXPONENT_START.to(score.device)
    lo = start[step(start.unsqueeze(-1))]
    powers = _EXPONENT_REFINE.to(score.device)
    refined = (lo.unsqueeze(-2) * powers.unsqueeze(-1)).clamp(max=_LARGEST_BINADE)
    lo = (lo * powers[step(refined)]).clamp(max=_LARGEST_BINADE)
    base = lo.clamp(min=_SMALLEST_NORMAL)  # 0: subnormals, spaced as [2^-126, 2^-125)
    for spacing, candidates in _MANTISSA_STEPS:
        offsets = torch.arange(candidates, dtype=score.dtype, device=score.device) * spacing
        chosen = step(lo.unsqueeze(-2) + base.unsqueeze(-2) * offsets.unsqueeze(-1))
        lo = lo + base * (chosen.to(score.dtype) * spacing)
    return lo


def select_tokens(score: torch.Tensor, k: int | torch.SymInt,
                  special_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-K of each row of `score` ([N] or [B, N]) with ties to the lower index, as
    (keep [..., S + K], rem [..., R], slot [..., N]).

    The first `special_tokens` S tokens (CLS, registers) are always kept and never scored; K counts
    the others. keep and rem are ascending token indices; slot[i] is token i's row in
    cat([kept, removed]), so `cat([kept_rows, removed_rows])[slot]` puts every token back in place.
    """
    score = score[..., special_tokens:]
    k_t = torch.scalar_tensor(k, dtype=torch.int64, device=score.device)
    return _with_specials(*_split(best_mask(score, kth_largest(score, k), k_t), k), special_tokens)


def _with_specials(keep: torch.Tensor, rem: torch.Tensor, slot: torch.Tensor,
                   special_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, rem, slot) over the patches, shifted past S special tokens that are always kept first."""
    if not special_tokens:
        return keep, rem, slot
    specials = torch.arange(special_tokens, device=keep.device).expand(*slot.shape[:-1], special_tokens)
    return torch.cat([specials, keep + special_tokens], -1), rem + special_tokens, torch.cat([specials, slot + special_tokens], -1)


def _split(keep_mask: torch.Tensor, k: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, rem, slot) of a mask with exactly K True per row (see `select_tokens`)."""
    order, slot = ordered(keep_mask, k)
    return order[..., :k], order[..., k:], slot


def ordered(keep_mask: torch.Tensor, k: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, slot) of a mask with exactly K True per row: order lists the True indices ascending,
    then the False ones; slot[i] is index i's place in order."""
    k_t = torch.scalar_tensor(k, dtype=torch.int64, device=keep_mask.device)
    slot = torch.where(keep_mask, count_up_to(keep_mask) - 1, count_up_to(~keep_mask) - 1 + k_t)
    index = torch.arange(keep_mask.shape[-1], device=keep_mask.device).expand_as(slot)
    return torch.zeros_like(slot).scatter(-1, slot, index), slot


def select_per_segment(score: torch.Tensor, k: int | torch.SymInt, segment: torch.Tensor,
                       retention_e4: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image selection for a packed sequence ([N] score, `segment` [N] ids in contiguous
    runs: images or temporal slices), as (keep, rem, slot) like `select_tokens`. Each segment of
    N_s tokens keeps its own best Q_s = (N_s * rho_e4) // 10^4; the K - sum(Q_s) slots left
    (fewer than the number of segments: each Q_s rounds down) go to the best of the rest over the
    whole call, so K stays (N * rho_e4) // 10^4 and shapes follow from N alone. Ties go to the
    lower index. A deviation from the authors, who select over the whole call (ipcv.md)."""
    first, last = run_bounds(segment)
    quota = torch.div((last - first + 1) * retention_e4, RETENTION_SCALE, rounding_mode="trunc")
    threshold = _search(score, quota, lambda at_least: _segment_sum(at_least, first, last))
    above, tied = score > threshold, score == threshold
    tied_before = count_up_to(tied) - _segment_prefix(tied, first)
    own = above | (tied & (tied_before <= quota - _segment_sum(above, first, last)))
    rest = torch.where(own, torch.full_like(score, -1.0), score)  # scores are >= 0: owned tokens never win again
    left = torch.scalar_tensor(k, dtype=torch.int64, device=score.device) - own.sum()
    return _split(own | best_mask(rest, kth_largest(rest, left), left), k)


def select_valid(score: torch.Tensor, k: int | torch.SymInt, valid: torch.Tensor,
                 retention_e4: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Selection in a padded tower's [B, P] rows (`valid` 1 for a real patch, 0 for padding), as
    (keep, rem, slot) like `select_tokens`: each image keeps its best K_b = max((V_b * rho_e4) // 10^4, 1)
    real patches (V_b of them; ties to the lower index), and its first K - K_b padding tokens fill
    the K = (P * rho_e4) // 10^4 slots every image has, so shapes follow from P alone. The filling
    padding stays padding (masked out of real tokens' attention, zeroed before the pooler); there is
    always enough of it, since K - K_b <= P - V_b."""
    real = valid.sum(-1, keepdim=True)
    quota = torch.maximum(torch.div(real * retention_e4, RETENTION_SCALE, rounding_mode="trunc"), torch.ones_like(real))
    ranked = torch.where(valid == 1, score, torch.full_like(score, -1.0))  # padding ranks below every real patch
    own = best_mask(ranked, kth_largest(ranked, quota.unsqueeze(-1)), quota)
    padding = valid == 0
    fill = padding & (count_up_to(padding) <= torch.scalar_tensor(k, dtype=torch.int64, device=score.device) - quota)
    return _split(own | fill, k)


def run_bounds(segment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N] index of the first and of the last token of each token's run of equal `segment` ids.
    Start positions are compacted by a permutation scatter (ONNX has no CumMax or searchsorted)."""
    n = segment.shape[0]
    starts = torch.cat([torch.ones(1, dtype=torch.bool, device=segment.device), segment[1:] != segment[:-1]])
    run = count_up_to(starts) - 1
    runs = starts.sum()
    slot = torch.where(starts, run, count_up_to(~starts) - 1 + runs)
    first_of_run = torch.zeros_like(run).scatter(0, slot, torch.arange(n, device=segment.device))
    following = torch.minimum(run + 1, torch.full_like(run, n - 1))  # Min, not Clip: TensorRT clips floats only
    last = torch.where(run + 1 < runs, first_of_run.index_select(0, following) - 1, torch.full_like(run, n - 1))
    return first_of_run.index_select(0, run), last


def _segment_prefix(mask: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """[..., N] running count of `mask` ([..., N]) before each token's run starts."""
    return (count_up_to(mask) - mask.to(torch.int64)).index_select(-1, first)


def _segment_sum(mask: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[..., N] count of True values of `mask` ([..., N]) in each token's run."""
    return count_up_to(mask).index_select(-1, last) - _segment_prefix(mask, first)


SPREAD_BITS = 7
"""Bits per grid coordinate of the spread order: grids up to 128 patches a side (contract.MAX_SIDE)."""


def spread_score(hidden: torch.Tensor, special_tokens: int, columns: int | torch.SymInt) -> torch.Tensor:
    """[..., N] scores that make `select_tokens` keep a prefix of a coarse-to-fine order of each
    image's patch grid (`columns` patches per row, row-major after S special tokens), for `hidden`
    [..., N, D]. At each scale, lowest bit first, a patch's code takes two bits: (row xor column)
    then row; so half the patches form a checkerboard, a quarter a lattice of stride 2, and so on.
    Score = 4^SPREAD_BITS - code: unique per patch, exact in fp32. Integer arithmetic only (trunc
    division of non-negative values), which TensorRT accepts; specials score 0 (never ranked)."""
    index = torch.arange(hidden.shape[-2] - special_tokens, device=hidden.device)
    row = torch.div(index, columns, rounding_mode="trunc")
    column = index - row * columns
    code = torch.zeros_like(index)
    for b in range(SPREAD_BITS):
        row_bit, column_bit = _bit(row, b), _bit(column, b)
        high = 2 * SPREAD_BITS - 1 - 2 * b
        code = code + (row_bit + column_bit - 2 * row_bit * column_bit) * 2 ** high + row_bit * 2 ** (high - 1)
    score = torch.cat([torch.zeros(special_tokens, dtype=torch.int64, device=hidden.device), 4 ** SPREAD_BITS - code])
    return score.to(torch.float32).expand(hidden.shape[:-1])


def hybrid_score(importance: torch.Tensor, spread: torch.Tensor, k: int | torch.SymInt) -> torch.Tensor:
    """[..., N] scores that make `select_tokens(., K)` keep the first K // 2 patches of the spread
    order (coverage: one patch per cell of a lattice) and then the K - K // 2 others that score
    best on `importance`. The spread part is lifted above every importance score."""
    base = torch.div(torch.scalar_tensor(k, dtype=torch.int64, device=spread.device), 2, rounding_mode="trunc")
    in_base = spread >= kth_largest(spread, base)
    lifted = importance.amax(-1, keepdim=True) * 2 + 1
    return torch.where(in_base, lifted, importance)


def unit_rows(states: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length, so that products of rows are cosines."""
    return states * torch.rsqrt((states * states).sum(-1, keepdim=True))


BIPARTITE_LIFT = 3.0
"""Score of bipartite selection's destinations: above every distinctness, which is at most 2."""


def bipartite_score(hidden: torch.Tensor, spread: torch.Tensor, k: int | torch.SymInt,
                    special_tokens: int) -> torch.Tensor:
    """[..., N] scores that make `select_tokens(., K)` keep ToMe's bipartite choice: the first
    K // 2 patches of the spread order are destinations (kept); of the others, those least like
    any destination (cosine of the states `hidden` [..., N, D]) are kept, and those a destination
    already nearly repeats are left to NGR. Distinctness = relu(1 - max cosine), in [0, 2]; the
    destinations score BIPARTITE_LIFT. The [N, K // 2] similarities are taken in row slices."""
    destinations = select_tokens(spread, k // 2, special_tokens)[0][..., special_tokens:]
    unit = unit_rows(hidden.float())
    targets = take(unit, destinations, unit.ndim - 2).transpose(-1, -2)
    product = torch.bmm if unit.ndim == 3 else torch.mm  # bmm: matmul's decomposition would guard B != 1
    chunks = row_chunks(unit, NEIGHBOR_CHUNKS, unit.ndim - 2)
    closest = torch.cat([product(chunk, targets).amax(-1) for chunk in chunks], -1)
    distinct = rankable(1 - closest)
    return distinct.scatter(-1, destinations, torch.full_like(destinations, BIPARTITE_LIFT, dtype=distinct.dtype))


def merge_rounds(retention_e4: int) -> int:
    """Rounds of bipartite merging `merge_tokens` runs: the fewest m with rho >= 2^-m. A full round
    halves P patches (floor), so m - 1 full rounds leave more than K = (P * rho) // 10^4 and the
    m-th, partial, reaches K exactly, for every P: the schedule is static."""
    rounds = 1
    while retention_e4 * 2 ** rounds < RETENTION_SCALE:
        rounds += 1
    return rounds


def merge_tokens(hidden: torch.Tensor, k: int | torch.SymInt, special_tokens: int,
                 rounds: int) -> tuple[torch.Tensor, ...]:
    """ToMe's bipartite merging of each image's patches ([B, N, D] states after S special tokens)
    down to K, as (keep, rem, slot, merged [B, S + K, D], owner [B, R, 1]).

    A round splits the current tokens by position into A (even) and B (odd); each A token's
    match is its most similar B token (cosine). The first `rounds` - 1 rounds merge every A token
    into its match; the last merges only the r = n - K A tokens with the best matches (ties to
    the lower index). A merged token's state is the plain mean of the patch states it gathered
    (ToMe's size-weighted mean), and it holds the place of the token that was never merged away
    (the last destination): keep are those places, rem the others, slot as in `select_tokens`.
    owner: each removed patch's row in `merged`, its one NGR neighbour. Averages are one-hot
    products (TensorRT's scatter cannot add).
    """
    states = hidden[:, special_tokens:].float()
    batch, patches = states.shape[0], states.shape[1]
    owner = origin = torch.arange(patches, device=states.device).expand(batch, patches)
    current = states
    for _ in range(rounds - 1):
        _, match = _best_match(current)
        halves = current.shape[1] // 2
        owner = _interleave(match, torch.arange(halves, device=states.device).expand(batch, halves)).gather(-1, owner)
        origin = origin[:, 1::2]
        current = group_means(states, owner, halves)
    similarity, match = _best_match(current)
    moving = current.shape[1] - k
    score = rankable(1 + similarity)
    moves = best_mask(score, kth_largest(score, moving), torch.scalar_tensor(moving, dtype=torch.int64, device=score.device))
    survivor = _interleave(~moves, torch.ones_like(moves[:, :current.shape[1] // 2]))
    rank = count_up_to(survivor) - 1
    last = torch.scalar_tensor(current.shape[1] - 1, dtype=torch.int64, device=rank.device)
    destination = rank.gather(-1, torch.minimum(2 * match + 1, last))  # 2j + 1: position of B's j-th token
    mapping = torch.where(survivor, rank, _interleave(destination, rank[:, 1::2]))
    owner = mapping.gather(-1, owner)
    origin = origin.gather(-1, _split(survivor, k)[0])
    kept_mask = torch.zeros_like(owner).scatter(-1, origin, torch.ones_like(origin)) > 0
    keep, rem, slot = _with_specials(*_split(kept_mask, k), special_tokens)
    merged = torch.cat([hidden[:, :special_tokens], group_means(states, owner, k).to(hidden.dtype)], 1)
    neighbor = owner.gather(-1, rem - special_tokens) + special_tokens
    return keep, rem, slot, merged, neighbor.unsqueeze(-1)


NO_MATCH = -2.0
"""Cosine of the padding column `_best_match` adds: below every real cosine, so never a match
unless set B is empty (one token left), where nothing moves."""


def _best_match(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each even-position token of states [B, n, D] (set A): the largest cosine to an
    odd-position token (set B) and that token's index in B (ties: the first), by row slices of A."""
    unit = unit_rows(states)
    targets = unit[:, 1::2].transpose(1, 2)
    best, match = [], []
    for chunk in row_chunks(unit[:, 0::2], NEIGHBOR_CHUNKS, 1):
        similarity = torch.bmm(chunk, targets)
        similarity = torch.cat([similarity, similarity.new_full((*similarity.shape[:-1], 1), NO_MATCH)], -1)
        value, index = similarity.max(-1)
        best.append(value)
        match.append(index)
    return torch.cat(best, -1), torch.cat(match, -1)


def _interleave(even: torch.Tensor, odd: torch.Tensor) -> torch.Tensor:
    """[B, n] with `even` ([B, ceil(n/2)]) at positions 0, 2, ... and `odd` ([B, floor(n/2)]) at 1, 3, ..."""
    position = torch.arange(even.shape[-1] + odd.shape[-1], device=even.device)
    half = torch.div(position, 2, rounding_mode="trunc")
    source = torch.where(position - 2 * half == 1, half + even.shape[-1], half)
    return torch.cat([even, odd], -1).index_select(-1, source)


def group_means(states: torch.Tensor, owner: torch.Tensor, groups: int | torch.SymInt) -> torch.Tensor:
    """[B, groups, D] mean of the rows of states [B, P, D] that `owner` [B, P] assigns to each group:
    one-hot products over row slices (the largest intermediate is P / 8 x groups)."""
    index = torch.arange(groups, device=owner.device)
    sums = counts = 0
    for rows, owners in zip(row_chunks(states, NEIGHBOR_CHUNKS, 1), row_chunks(owner, NEIGHBOR_CHUNKS, 1)):
        one_hot = (owners.unsqueeze(-1) == index).to(states.dtype)
        sums = sums + torch.bmm(one_hot.transpose(1, 2), rows)
        counts = counts + one_hot.sum(1)
    return sums / counts.unsqueeze(-1)


def _bit(x: torch.Tensor, b: int) -> torch.Tensor:
    shifted = torch.div(x, 2 ** b, rounding_mode="trunc")
    return shifted - 2 * torch.div(shifted, 2, rounding_mode="trunc")


def best_mask(score: torch.Tensor, threshold: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Membership mask of the `count` best of each row of `score`, given the count-th best value
    `threshold` ([..., 1] or a scalar): everything above it, then the tied values in index order
    (ties go to the lower index)."""
    above = score > threshold
    tied = score == threshold
    return above | (tied & (count_up_to(tied) <= count - above.sum(-1, keepdim=True)))


def count_up_to(mask: torch.Tensor) -> torch.Tensor:
    """int64 running count of True values along the last axis. The sum runs in fp32 (exact below
    2^24 tokens) because TensorRT's CumSum accepts only floating-point inputs."""
    return torch.cumsum(mask.to(torch.float32), -1).to(torch.int64)


def take(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """Entries `index` of x along `dim`. A [K] index picks the same entries in every row; a [B, K]
    index picks per batch entry (x's first axis), through one flat Gather rather than a
    GatherElements whose index would be as large as the result."""
    if index.ndim == 1:
        return x.index_select(dim, index)
    moved = x.movedim(dim, 1)
    batch, length, rest = moved.shape[0], moved.shape[1], moved.shape[2:]
    offsets = torch.arange(batch, device=index.device)[:, None] * length
    flat = moved.reshape(batch * length, *rest).index_select(0, (index + offsets).reshape(-1))
    return flat.reshape(batch, index.shape[1], *rest).movedim(1, dim)


NEIGHBOR_CHUNKS = 8
"""The neighbour search handles the removed tokens in this many slices, one after the other, so
its largest intermediate is [R / 8, K] distances: 0.5 GB at N = 65536, rho = 0.5."""


def nearest_kept(kept: torch.Tensor, removed: torch.Tensor, neighbors: int, across_batch: bool = False,
                 kept_valid: torch.Tensor | None = None, removed_valid: torch.Tensor | None = None) -> torch.Tensor:
    """[..., R, k] indices into `kept` ([..., K, D]) of each removed token's nearest kept tokens
    (fp32 L2), within the same batch entry; with `across_batch`, among the kept tokens of every
    batch entry, as indices into the flattened [B * K] kept tokens.

    When K < k only the first K columns are real neighbours; the others hold the index K, one past
    the end, which `reconstruct` ignores. Padding keeps k static instead of min(k, K).
    A padded tower gives which kept and removed tokens are real patches ([..., K] and [..., R], 1
    or 0): padding is never a neighbour, and a removed padding token has none (index K throughout).
    """
    candidates = (kept.flatten(0, 1) if across_batch else kept).float()  # across: one [B * K, D] pool
    norms = (candidates * candidates).sum(-1).unsqueeze(-2)
    axis = removed.ndim - 2
    chunks = row_chunks(removed, NEIGHBOR_CHUNKS, axis)  # each image's removed tokens, in slices
    if kept_valid is None:
        return torch.cat([_nearest(candidates, norms, chunk.float(), neighbors) for chunk in chunks], -2)
    kept_padding = (kept_valid == 0).unsqueeze(-2)
    removed_padding = row_chunks((removed_valid == 0).unsqueeze(-1), NEIGHBOR_CHUNKS, axis)
    return torch.cat([_nearest(candidates, norms, chunk.float(), neighbors, kept_padding | padding)
                      for chunk, padding in zip(chunks, removed_padding)], -2)


def row_chunks(x: torch.Tensor, chunks: int, dim: int = 0) -> list[torch.Tensor]:
    """`chunks` consecutive slices of x along `dim`, sizes differing by at most one (some may be
    empty). Bounds are i * n // chunks, so a symbolic n needs no guard on its divisibility."""
    n = x.shape[dim]
    bounds = [i * n // chunks for i in range(chunks + 1)]
    return [x.narrow(dim, start, stop - start) for start, stop in zip(bounds, bounds[1:])]


def _nearest(kept: torch.Tensor, kept_norms: torch.Tensor, removed: torch.Tensor, neighbors: int,
             excluded: torch.Tensor | None = None) -> torch.Tensor:
    """`excluded` ([..., R, K] bool, broadcast): pairs that are no neighbours at any distance."""
    dist = (removed * removed).sum(-1, keepdim=True) - 2 * removed @ kept.transpose(-1, -2) + kept_norms
    if excluded is not None:
        dist = torch.where(excluded, torch.full_like(dist, float("inf")), dist)
    padding = torch.full((*dist.shape[:-1], neighbors), float("inf"), device=dist.device)
    found = torch.topk(torch.cat([dist, padding], -1), neighbors, dim=-1, largest=False, sorted=True)
    none = torch.scalar_tensor(kept.shape[-2], dtype=found.indices.dtype, device=found.indices.device)
    if excluded is not None:  # an excluded pair ties with the padding columns: either way, no neighbour
        return torch.where(found.values == float("inf"), none, found.indices)
    return torch.minimum(found.indices, none)


def reconstruct(kept_now: torch.Tensor, kept_then: torch.Tensor, removed_then: torch.Tensor,
                neighbor_index: torch.Tensor, across_batch: bool = False,
                weights: torch.Tensor | None = None) -> torch.Tensor:
    """NGR: removed_then + mean over neighbours of (kept_now - kept_then), shape [..., R, D];
    with `weights` ([..., R, k], from `neighbor_weights`), their weighted sum instead.
    `across_batch`: the indices point into the flattened batch (see `nearest_kept`).

    Index K in `neighbor_index` is padding (see `nearest_kept`): it reads a zero row and is not counted.
    """
    if across_batch:
        flat = reconstruct(kept_now.flatten(0, 1), kept_then.flatten(0, 1), removed_then.flatten(0, 1),
                           neighbor_index.flatten(0, 1), weights=None if weights is None else weights.flatten(0, 1))
        return flat.unflatten(0, removed_then.shape[:2])
    gathered = _gather_neighbors(kept_now - kept_then, neighbor_index)
    if weights is not None:
        return removed_then + (gathered * weights.to(gathered.dtype).unsqueeze(-1)).sum(-2)
    count = (neighbor_index < kept_now.shape[-2]).sum(-1, keepdim=True).to(gathered.dtype)
    return removed_then + gathered.sum(-2) / count.clamp(min=1.0)  # a padding token has no neighbour: no drift


def _gather_neighbors(kept: torch.Tensor, neighbor_index: torch.Tensor) -> torch.Tensor:
    """[..., R, k, D] rows of `kept` ([..., K, D]) at `neighbor_index`; the padding index K reads zeros."""
    tokens_axis = kept.ndim - 2
    padded = torch.cat([kept, torch.zeros_like(kept.narrow(tokens_axis, 0, 1))], tokens_axis)
    r, k = neighbor_index.shape[-2:]
    return take(padded, neighbor_index.flatten(-2), tokens_axis).unflatten(tokens_axis, (r, k))


WEIGHT_EPSILON = 1e-6
"""Added to squared distances before inverting them: a neighbour at distance 0 (a duplicate state)
then takes nearly all the weight instead of dividing by zero."""


def neighbor_weights(kept: torch.Tensor, removed: torch.Tensor, neighbor_index: torch.Tensor,
                     across_batch: bool = False) -> torch.Tensor:
    """[..., R, k] fp32 NGR weights by similarity: each removed token's neighbours weighted by
    inverse squared distance at the pruning point (1 / (d^2 + eps), normalised to sum to 1; the
    interpolation of PointNet++'s feature propagation), so nearer neighbours lend more of their
    drift. Padding neighbours weigh 0. Computed once, next to the neighbour search."""
    if across_batch:
        flat = neighbor_weights(kept.flatten(0, 1), removed.flatten(0, 1), neighbor_index.flatten(0, 1))
        return flat.unflatten(0, removed.shape[:2])
    gathered = _gather_neighbors(kept.float(), neighbor_index)
    difference = gathered - removed.float().unsqueeze(-2)
    inverse = 1.0 / ((difference * difference).sum(-1) + WEIGHT_EPSILON)
    inverse = torch.where(neighbor_index < kept.shape[-2], inverse, torch.zeros_like(inverse))
    return inverse / inverse.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)  # none: weights 0


def scatter_back(kept_rows: torch.Tensor, removed_rows: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[..., N, D] sequence in original order from kept rows ([..., K, D]) and removed rows ([..., R, D])."""
    tokens_axis = kept_rows.ndim - 2
    return take(torch.cat([kept_rows, removed_rows], tokens_axis), slot, tokens_axis)


def project_except_queries(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, keep: torch.Tensor,
                           rem: torch.Tensor, slot: torch.Tensor, columns: tuple[int, int]) -> torch.Tensor:
    """linear(x, weight, bias) [N, F] with output columns [start, stop) (the queries) computed for
    kept rows only; removed rows hold zeros there, which nothing reads (an AS block's attention
    takes queries from kept rows only). Saves (N - K) * (stop - start) * in_features MACs."""
    start, stop = columns
    tokens_axis = x.ndim - 2
    kept = torch.nn.functional.linear(take(x, keep, tokens_axis), weight, bias)
    if (start, stop) == (0, weight.shape[0]):  # a projection of queries only: removed rows need none
        return scatter_back(kept, kept.new_zeros(*rem.shape, stop), slot)
    other_weight = torch.cat([weight[:start], weight[stop:]])
    other_bias = None if bias is None else torch.cat([bias[:start], bias[stop:]])
    other = torch.nn.functional.linear(take(x, rem, tokens_axis), other_weight, other_bias)
    removed = torch.cat([other[..., :start], other.new_zeros(*other.shape[:-1], stop - start), other[..., start:]], -1)
    return scatter_back(kept, removed, slot)


def no_selection(pixels: torch.Tensor, neighbors: int, special_tokens: int = 0,
                 patch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection outputs when nothing is pruned (rho = 1): keep = 0..N-1, no neighbours. `pixels`:
    a packed tower's [N, w] rows, or (with patch_size) a batched tower's [B, C, H, W] images, whose
    N = S + (H/p)(W/p) tokens per image are kept per image, or a padded tower's [B, P, w] rows."""
    if pixels.ndim == 3:
        batch, n = (pixels.shape[0],), pixels.shape[1]
    elif patch_size is None:
        batch, n = (), pixels.shape[0]
    else:
        batch, n = (pixels.shape[0],), special_tokens + (pixels.shape[2] // patch_size) * (pixels.shape[3] // patch_size)
    keep = torch.arange(n, device=pixels.device).expand(*batch, n)
    if not batch:  # OpenVINO (2026.4.1) reads a constant [0, k] output as a scalar: tile an empty slice of keep
        return keep, keep.narrow(0, 0, 0).unsqueeze(-1).repeat(1, neighbors)
    return keep, torch.zeros((*batch, 0, neighbors), dtype=torch.int64, device=pixels.device)
