"""FLOPs of an exported program, counted on its graph with fake tensors.

`torch.utils.flop_counter` counts the matrix products (linear, conv, attention) that every
operator of the graph performs for inputs of a given N; fake tensors make this take a fraction of
a second at any N, with no memory for activations. Element-wise work is not counted (it is a small
share of a ViT and is bandwidth-bound, not compute-bound). The attention core counts its dense
[Nq, Nk] products, or its band's where segments are short runs (windows), which is what the
decomposed graph computes.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import ops
from .capture import counting_inputs
from .config import IpcvConfig
from .models import LoadedEncoder
from .tokens import RETENTION_SCALE


@register_flop_formula(torch.ops.ipcv.segment_attention)
def _segment_attention_flops(query, key, value, segment_q=None, segment_k=None, scale=None, span=None, *_args,
                             out_shape=None, **_kwargs) -> int:
    """Q K^T and (softmax) V: two products of Nq x Nk x d per head; banded (span given): of
    band_rows(N) x BAND_TILES * span, what the decomposition computes."""
    batch, heads, n_query, depth = query
    n_key = key[2] if span is None else ops.BAND_TILES * span
    rows = n_query if span is None else ops.band_rows(n_query, span)
    return 2 * batch * heads * rows * n_key * (depth + value[3])


def program_flops(program: torch.export.ExportedProgram, encoder: LoadedEncoder, tokens: int) -> int:
    """Total FLOPs of one call of `program` on N = tokens patches (one segment or image)."""
    module = program.module()
    with FakeTensorMode(allow_non_fake_inputs=True):
        inputs = counting_inputs(encoder, tokens)
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    return counter.get_total_flops()


def floor_ratio(encoder: LoadedEncoder, config: IpcvConfig, tokens: int) -> float:
    """IPCV / original FLOPs by the family's cost model (`ModelDescription.flop_floor`), N = tokens."""
    floor, vision = encoder.description.flop_floor, encoder.module.config
    ipcv = floor(vision, config.retention_e4, config.prune_layer, config.as_depth, tokens, config.selection)
    return ipcv / floor(vision, RETENTION_SCALE, config.prune_layer, config.as_depth, tokens)
