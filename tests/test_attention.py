"""The attention core's banded decomposition equals the dense masked one wherever its premise holds."""

from __future__ import annotations

import pytest
import torch

from ipcv_export import ops


def _runs(lengths: list[int]) -> torch.Tensor:
    """Segment ids in contiguous runs of the given lengths, ids neither 0-based nor consecutive."""
    return torch.repeat_interleave(torch.arange(len(lengths)) * 7 + 3, torch.tensor(lengths))


@pytest.mark.parametrize("lengths,span", [([1], 4), ([3, 4], 4), ([64], 64), ([64, 64, 64], 64),
                                          ([1, 64, 63, 2, 64, 17], 64), ([30] * 33 + [7], 32)], ids=str)
def test_band_equals_dense_for_runs_up_to_the_span(lengths, span):
    """Runs that start anywhere in a tile, fill it, straddle two, and a length that is no multiple of it."""
    segments = _runs(lengths)
    generator = torch.Generator().manual_seed(len(lengths))
    q, k, v = (torch.randn(2, 3, len(segments), 8, generator=generator) for _ in range(3))
    dense = ops._masked_attention(q, k, v, segments, segments, 0.3)
    banded = ops._banded_attention(q, k, v, segments, segments, 0.3, span)
    assert banded.shape == dense.shape
    assert (banded - dense).abs().max() <= 1e-6


def test_band_misses_what_lies_beyond_its_span():
    """Guards the test above: a run longer than the span is not attended whole."""
    segments = _runs([40, 200])
    q, k, v = (torch.randn(1, 1, 240, 4, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    dense = ops._masked_attention(q, k, v, segments, segments, 0.5)
    assert (ops._banded_attention(q, k, v, segments, segments, 0.5, 64) - dense).abs().max() > 1e-3
