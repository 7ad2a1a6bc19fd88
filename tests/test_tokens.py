"""The token functions the passes insert, against plain formulations of ipcv.md."""

import pytest
import torch

from ipcv_export import tokens


def _reference_keep(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(score, descending=True, stable=True).indices[:k].sort().values


@pytest.mark.parametrize("n", [1, 2, 4, 5, 64, 333, 1024, 5000])
@pytest.mark.parametrize("ties", ["none", "some", "all"])
def test_select_tokens_is_exact_top_k_with_ties_to_lower_index(n, ties):
    score = torch.rand(n, generator=torch.Generator().manual_seed(n))
    if ties == "some":
        score[::3] = score[0]
    elif ties == "all":
        score[:] = 0.25
    for k in sorted({1, max(1, n // 3), n // 2 or 1, n}):
        keep, rem, slot = tokens.select_tokens(score, k)
        expected = _reference_keep(score, k)
        assert torch.equal(keep, expected)
        assert torch.equal(torch.sort(torch.cat([keep, rem])).values, torch.arange(n))
        assert torch.equal(rem, rem.sort().values)
        rows = torch.arange(n).float()[:, None]
        assert torch.equal(tokens.scatter_back(rows[keep], rows[rem], slot), rows)


def test_select_tokens_with_zero_scores_and_huge_range():
    score = torch.tensor([0.0, 1e30, 0.0, 3.0, 1e-20, 3.0, 0.0])
    for k in range(1, 8):
        assert torch.equal(tokens.select_tokens(score, k)[0], _reference_keep(score, k))


def test_kept_count_uses_integer_arithmetic():
    assert tokens.kept_count(5220, 3500) == 1827  # float truncation of 5220 * 0.35 gives 1826
    assert tokens.kept_count(100, 10_000) == 100
    assert tokens.min_tokens(3500) == 3 and tokens.kept_count(3, 3500) == 1 and tokens.kept_count(2, 3500) == 0


def test_nearest_kept_matches_cdist_and_pads_when_k_exceeds_kept():
    g = torch.Generator().manual_seed(0)
    kept, removed = torch.randn(50, 8, generator=g), torch.randn(30, 8, generator=g)
    index = tokens.nearest_kept(kept, removed, 10)
    expected = torch.cdist(removed, kept).topk(10, largest=False).indices
    assert torch.equal(index.sort(-1).values, expected.sort(-1).values)
    few = tokens.nearest_kept(kept[:3], removed, 10)
    assert (few[:, 3:] == 3).all() and torch.equal(few[:, :3].sort(-1).values, torch.arange(3).expand(30, 3))


def test_chunked_neighbour_search_handles_fewer_rows_than_chunks():
    g = torch.Generator().manual_seed(2)
    kept = torch.randn(20, 4, generator=g)
    for rows in (0, 1, 3, tokens.NEIGHBOR_CHUNKS + 1):
        removed = torch.randn(rows, 4, generator=g)
        index = tokens.nearest_kept(kept, removed, 5)
        assert index.shape == (rows, 5)
        if rows:
            expected = torch.cdist(removed, kept).topk(5, largest=False).indices
            assert torch.equal(index.sort(-1).values, expected.sort(-1).values)


def test_row_chunks_cover_every_row_once_in_order():
    x = torch.arange(13)
    for chunks in (1, 4, 8, 20):
        parts = tokens.row_chunks(x, chunks)
        assert len(parts) == chunks and torch.equal(torch.cat(parts), x)
        assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


def test_reconstruct_is_mean_neighbour_drift_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    then, now, removed = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g), torch.randn(2, 5, generator=g)
    index = torch.tensor([[0, 2, 4, 4], [3, 4, 4, 4]])  # 4 == K: padding
    rec = tokens.reconstruct(now, then, removed, index)
    drift = now - then
    torch.testing.assert_close(rec[0], removed[0] + (drift[0] + drift[2]) / 2)
    torch.testing.assert_close(rec[1], removed[1] + drift[3])


def test_select_tokens_over_the_whole_fp32_range():
    g = torch.Generator().manual_seed(3)
    exponents = torch.empty(4000).uniform_(-44, 38, generator=g)
    score = torch.pow(10.0, exponents)
    score[::97] = 0.0
    score[1::89] = score[1]
    for k in (1, 7, 500, 1999, 2000, 3999, 4000):
        assert torch.equal(tokens.select_tokens(score, k)[0], _reference_keep(score, k))


def test_kth_largest_is_exact_at_binade_edges_subnormals_and_the_top_binade():
    """The radix search's hard cases: powers of two and their neighbours one ulp away, subnormals,
    the largest binade it covers (hybrid selection lifts scores up to 2^126), in batched rows."""
    edges = [2.0**e for e in (-149, -140, -127, -126, -125, -1, 0, 1, 23, 24, 113, 114, 115, 125, 126)]
    values = torch.tensor(edges + [0.0, 3.0, 2.0**126 * 1.5])
    values = torch.cat([values, torch.nextafter(values, torch.tensor(0.0)), torch.nextafter(values, torch.tensor(1e38))])
    values = values[(values >= 0) & (values < 2.0**127)]
    rows = torch.stack([values, values.flip(0), values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))]])
    for k in range(1, len(values) + 1):
        expected = torch.sort(rows, descending=True).values[:, k - 1:k]
        assert torch.equal(tokens.kth_largest(rows, k), expected), k


@pytest.mark.parametrize("chunks", [None, 32])
def test_chunked_attention_decomposition_equals_one_sdpa(chunks):
    """Dense attention in query slices (the default count, and Qwen2.5-VL's full blocks' 32, more
    slices than rows) equals one SDPA."""
    from ipcv_export.ops import QUERY_CHUNKS, decompositions

    decomposed = decompositions()[torch.ops.ipcv.segment_attention.default]
    slices = chunks or QUERY_CHUNKS
    attention = (decomposed if chunks is None
                 else lambda *args: decomposed(*args, None, chunks))
    g = torch.Generator().manual_seed(3)
    for queries in (1, slices - 1, 50):
        q = torch.randn(1, 2, queries, 8, generator=g)
        k, v = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
        seg_q, seg_k = torch.randint(0, 3, (queries,), generator=g), torch.arange(40) % 3
        whole = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=seg_q[:, None] == seg_k, scale=0.3)
        torch.testing.assert_close(attention(q, k, v, seg_q, seg_k, 0.3), whole.transpose(1, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("special", [0, 1, 4])
def test_batched_selection_is_the_packed_selection_per_row(special):
    """[B, N] scores select per row exactly as each row alone would, special tokens first and kept."""
    score = torch.rand(3, 50, generator=torch.Generator().manual_seed(special))
    score[1, 10:30] = score[1, 10]  # ties in one row only
    k = 17
    keep, rem, slot = tokens.select_tokens(score, k, special)
    assert keep.shape == (3, special + k) and rem.shape == (3, 50 - special - k)
    rows = torch.arange(3 * 50).float().reshape(3, 50, 1)
    for b in range(3):
        alone = _reference_keep(score[b, special:], k) + special
        assert torch.equal(keep[b], torch.cat([torch.arange(special), alone]))
    assert torch.equal(tokens.scatter_back(tokens.take(rows, keep, 1), tokens.take(rows, rem, 1), slot), rows)


def test_batched_neighbours_and_reconstruction_stay_within_each_row():
    generator = torch.Generator().manual_seed(3)
    kept, removed = torch.randn(2, 9, 5, generator=generator), torch.randn(2, 14, 5, generator=generator)
    now = kept + torch.randn(2, 9, 5, generator=generator)
    index = tokens.nearest_kept(kept, removed, 4)
    rebuilt = tokens.reconstruct(now, kept, removed, index)
    for b in range(2):
        assert torch.equal(index[b], tokens.nearest_kept(kept[b], removed[b], 4))
        torch.testing.assert_close(rebuilt[b], tokens.reconstruct(now[b], kept[b], removed[b], index[b]), rtol=0, atol=1e-6)
    few = tokens.nearest_kept(kept[:, :2], removed, 4)  # K < k: padded with index K, ignored
    torch.testing.assert_close(tokens.reconstruct(now[:, :2], kept[:, :2], removed, few),
                               removed + (now[:, :2] - kept[:, :2]).mean(1, keepdim=True), rtol=0, atol=1e-6)


def test_similarity_weights_favour_nearer_neighbours_and_ignore_padding():
    kept = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 9.0]])
    removed = torch.tensor([[1.0, 0.0]])
    index = torch.tensor([[0, 1, 3]])  # 3 = padding (K = 3)
    weights = tokens.neighbor_weights(kept, removed, index)
    expected = torch.tensor([1 / (1 + 1e-6), 1 / (4 + 1e-6), 0.0])  # squared distances 1 and 4
    torch.testing.assert_close(weights, (expected / expected.sum())[None], rtol=1e-6, atol=0)
    drift_now = kept + torch.tensor([[1.0, 1.0], [5.0, 5.0], [100.0, 100.0]])
    rebuilt = tokens.reconstruct(drift_now, kept, removed, index, weights=weights)
    torch.testing.assert_close(rebuilt, removed + (0.8 * 1 + 0.2 * 5), rtol=1e-5, atol=1e-5)


def test_similarity_weights_with_one_neighbour_are_the_plain_mean():
    g = torch.Generator().manual_seed(0)
    kept, removed = torch.randn(2, 9, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    index = tokens.nearest_kept(kept, removed, 1)
    now = kept + torch.randn(2, 9, 4, generator=g)
    weights = tokens.neighbor_weights(kept, removed, index)
    assert torch.equal(weights, torch.ones_like(weights))
    torch.testing.assert_close(tokens.reconstruct(now, kept, removed, index, weights=weights),
                               tokens.reconstruct(now, kept, removed, index), rtol=0, atol=1e-6)


def test_neighbours_across_the_batch_index_the_flattened_kept_tokens():
    g = torch.Generator().manual_seed(1)
    kept, removed = torch.randn(3, 6, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    index = tokens.nearest_kept(kept, removed, 4, across_batch=True)
    flat = kept.flatten(0, 1)
    expected = torch.cdist(removed, flat[None].expand(3, -1, -1)).topk(4, largest=False).indices
    assert torch.equal(index, expected)
    now = kept + torch.randn(3, 6, 4, generator=g)
    rebuilt = tokens.reconstruct(now, kept, removed, index, across_batch=True)
    torch.testing.assert_close(rebuilt, removed + (now - kept).flatten(0, 1)[index].mean(-2), rtol=0, atol=1e-6)


def test_hybrid_selection_keeps_half_by_spread_then_the_best_scores():
    from ipcv_export.reference import spread_order

    columns, rows, k = 6, 4, 9
    score = torch.rand(2, rows * columns, generator=torch.Generator().manual_seed(3))
    spread = tokens.spread_score(torch.zeros(2, rows * columns, 1), 0, columns)
    keep, _, _ = tokens.select_tokens(tokens.hybrid_score(score, spread, k), k)
    base = spread_order(columns, rows * columns)[:k // 2]
    for row in range(2):
        rest = score[row].index_fill(0, base, -1.0).topk(k - k // 2).indices
        assert torch.equal(keep[row], torch.cat([base, rest]).sort().values)


def test_bipartite_selection_keeps_half_by_spread_then_the_least_repeated():
    from ipcv_export.reference import spread_order

    columns, rows, k, special = 6, 4, 9, 1
    hidden = torch.randn(2, special + rows * columns, 5, generator=torch.Generator().manual_seed(4))
    spread = tokens.spread_score(hidden, special, columns)
    keep, _, _ = tokens.select_tokens(tokens.bipartite_score(hidden, spread, k, special), k, special)
    base = spread_order(columns, rows * columns)[:k // 2]
    unit = torch.nn.functional.normalize(hidden[:, special:], dim=-1)
    for row in range(2):
        closest = (unit[row] @ unit[row, base].T).amax(-1)
        rest = closest.index_fill(0, base, 2.0).topk(k - k // 2, largest=False).indices
        assert torch.equal(keep[row], torch.cat([torch.arange(special), special + torch.cat([base, rest]).sort().values]))


@pytest.mark.parametrize("retention_e4", [9000, 5000, 3500, 2500, 2000, 1000, 600])
def test_merge_rounds_reach_k_like_the_reference_at_every_size(retention_e4):
    """The graph's static schedule (rounds - 1 full rounds, then a partial one) makes the
    reference's choices (rounds until K, each merging min(|A|, n - K)) at every patch count,
    including those whose last round has a single token."""
    from ipcv_export.reference import merged_states, merge_plan

    rounds = tokens.merge_rounds(retention_e4)
    assert retention_e4 * 2 ** rounds >= 10_000 > retention_e4 * 2 ** (rounds - 1)
    for patches in range(2, 70):
        k = patches * retention_e4 // 10_000
        if k < 1:
            continue
        hidden = torch.randn(2, 1 + patches, 6, generator=torch.Generator().manual_seed(patches))
        keep, rem, slot, merged, owner = tokens.merge_tokens(hidden, k, 1, rounds)
        reference_keep, reference_owner = merge_plan(hidden, 1, k)
        assert torch.equal(keep, reference_keep) and torch.equal(owner, reference_owner), patches
        torch.testing.assert_close(merged, merged_states(hidden, keep, rem, owner[..., 0]), rtol=0, atol=1e-6)
        assert torch.equal(torch.cat([keep, rem], -1).gather(-1, slot), torch.arange(1 + patches).expand(2, -1))


def test_merging_joins_a_repeated_patch_into_its_copy_first():
    """One merge (K = P - 1): the even-position patch whose odd-position copy is exact goes, and its
    owner (the copy's row) carries their mean, which is the copy itself."""
    hidden = torch.randn(1, 1 + 8, 16, generator=torch.Generator().manual_seed(3))
    hidden[0, 1 + 4] = hidden[0, 1 + 5]
    keep, rem, _, merged, owner = tokens.merge_tokens(hidden, 7, 1, tokens.merge_rounds(8750))
    assert rem.tolist() == [[5]] and keep.tolist() == [[0, 1, 2, 3, 4, 6, 7, 8]]
    assert owner.tolist() == [[[5]]]  # row 5 of keep: token 6
    torch.testing.assert_close(merged[0, 5], hidden[0, 6])
    torch.testing.assert_close(merged[0, [0, 1, 2, 3, 4, 6, 7]], hidden[0, [0, 1, 2, 3, 4, 7, 8]])


@pytest.mark.parametrize("sizes", [[16], [12, 40, 8], [3, 5, 64, 1, 7]])
@pytest.mark.parametrize("retention_e4", [5000, 3500, 2000])
def test_per_segment_selection_is_each_images_share_then_the_best_of_the_rest(sizes, retention_e4):
    from ipcv_export.reference import per_image_keep

    segments = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    g = torch.Generator().manual_seed(sum(sizes) + retention_e4)
    score = torch.randint(0, 4, (len(segments),), generator=g).float()  # many exact ties, zeros included
    k = len(segments) * retention_e4 // 10_000
    keep, rem, slot = tokens.select_per_segment(score, k, segments, retention_e4)
    assert torch.equal(keep, per_image_keep(score, segments, k, retention_e4))
    assert torch.equal(torch.cat([keep, rem]).sort().values, torch.arange(len(segments)))
    assert torch.equal(torch.cat([keep, rem])[slot], torch.arange(len(segments)))
    for segment, size in enumerate(sizes):  # every image keeps at least its own share
        assert int((segments[keep] == segment).sum()) >= size * retention_e4 // 10_000


def test_run_bounds_of_contiguous_segments():
    segments = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    first, last = tokens.run_bounds(segments)
    assert first.tolist() == [0, 0, 2, 3, 3, 3, 6] and last.tolist() == [1, 1, 2, 5, 5, 5, 6]


def test_per_segment_selection_over_the_whole_fp32_range():
    """The per-segment bisection has no final snap to a score value: it must converge exactly."""
    from ipcv_export.reference import per_image_keep

    g = torch.Generator().manual_seed(4)
    score = torch.pow(10.0, torch.empty(3000).uniform_(-44, 38, generator=g))
    score[::97] = 0.0
    score[1::89] = score[1]
    segments = torch.repeat_interleave(torch.arange(4), torch.tensor([1000, 7, 1500, 493]))
    for retention_e4 in (5000, 3500, 1, 9999):
        k = 3000 * retention_e4 // 10_000
        keep = tokens.select_per_segment(score, k, segments, retention_e4)[0]
        assert torch.equal(keep, per_image_keep(score, segments, k, retention_e4))


NON_FINITE = torch.tensor([0.5, float("nan"), 2.0, float("inf"), 0.0, float("nan"), 3e38, 1.0, float("inf")])


def test_rankable_scores_rank_nan_as_zero_and_cap_the_rest():
    ranked = tokens.rankable(NON_FINITE)
    assert torch.isfinite(ranked).all() and (ranked >= 0).all()
    assert ranked[1] == 0 and ranked[5] == 0 and ranked[3] == tokens.SCORE_CEILING == ranked[6] == ranked[8]
    assert torch.equal(ranked[[0, 2, 4, 7]], NON_FINITE[[0, 2, 4, 7]])


@pytest.mark.parametrize("k", range(1, len(NON_FINITE) + 1))
def test_selection_is_a_valid_permutation_for_nan_and_inf_scores(k):
    """One NaN or inf pixel must not break the counting (an out-of-range scatter index)."""
    for score in (NON_FINITE, torch.full((9,), float("nan")), torch.full((9,), float("inf"))):
        ranked = tokens.rankable(score)
        keep, rem, slot = tokens.select_tokens(ranked, k)
        assert torch.equal(keep, _reference_keep(ranked, k))
        assert torch.equal(torch.sort(torch.cat([keep, rem])).values, torch.arange(9))
        assert torch.equal(torch.sort(slot).values, torch.arange(9))
        retention_e4 = -(-k * 10_000 // 9)  # the smallest retention that keeps k of 9
        keep, rem, slot = tokens.select_per_segment(ranked, k, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1]), retention_e4)
        assert len(keep) == k and torch.equal(torch.sort(slot).values, torch.arange(9))


def test_importance_of_non_finite_states_is_rankable():
    before = torch.zeros(4, 3)
    after = torch.tensor([[1.0, 0, 0], [float("nan"), 0, 0], [float("inf"), 0, 0], [1e30, 1e30, 0]])
    assert torch.equal(tokens.importance_score(before, after), torch.tensor([1.0, 0, tokens.SCORE_CEILING, tokens.SCORE_CEILING]))


@pytest.mark.parametrize("retention_e4", [5000, 3500, 10000])
def test_padded_selection_keeps_each_images_real_best_then_its_first_padding(retention_e4):
    """Per row: the max((V * rho) // 10^4, 1) best real tokens (ties to the lower index, scores
    drawn from few values), then the first padding tokens until K slots; never a real token past
    its share, never padding over a real token."""
    generator = torch.Generator().manual_seed(0)
    n = 45
    real = torch.tensor([45, 27, 3, 1])
    valid = (torch.arange(n) < real[:, None]).long()
    score = torch.randint(0, 4, (len(real), n), generator=generator).float()
    k = tokens.kept_count(n, retention_e4)
    keep, rem, slot = tokens.select_valid(score, k, valid, retention_e4)
    for row, v in enumerate(real.tolist()):
        own = max(v * retention_e4 // 10_000, 1)
        best = torch.sort(score[row, :v], descending=True, stable=True).indices[:own].sort().values
        assert torch.equal(keep[row], torch.cat([best, torch.arange(v, v + k - own)]))
        assert torch.equal(torch.cat([keep[row], rem[row]]).sort().values, torch.arange(n))
        assert torch.equal(torch.cat([keep[row], rem[row]])[slot[row]], torch.arange(n))


def test_padded_neighbour_search_skips_padding_both_ways():
    """A removed real token's neighbours are the nearest kept real tokens (index K past them); a
    removed padding token has none; reconstruction gives it no drift."""
    generator = torch.Generator().manual_seed(1)
    kept, removed = torch.randn(1, 5, 4, generator=generator), torch.randn(1, 6, 4, generator=generator)
    kept_valid, removed_valid = torch.tensor([[1, 1, 1, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]])
    found = tokens.nearest_kept(kept, removed, 4, False, kept_valid, removed_valid)
    expected = torch.cdist(removed[0, :4], kept[0, :3]).topk(3, largest=False).indices
    assert torch.equal(found[0, :4, :3], expected) and (found[0, :4, 3] == 5).all()
    assert (found[0, 4:] == 5).all()
    rebuilt = tokens.reconstruct(kept + 1.0, kept, removed, found)
    assert torch.allclose(rebuilt[0, :4], removed[0, :4] + 1.0) and torch.equal(rebuilt[0, 4:], removed[0, 4:])
