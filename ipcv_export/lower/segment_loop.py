"""ONNX Runtime's form of attention over several segments: an ONNX `Loop` over the segments.

A packed call holds several images or temporal slices; the stock kernels attend within each one
and pay the sum of L_q * L_k over segments, where one dense masked product pays N_q * N_k.
No static-shaped ONNX form pays only the sum for an arbitrary mix of lengths
(`../shared/docs/segment-attention.md`), but ONNX Runtime runs a `Loop` whose iterations slice
value-dependent ranges, as Microsoft's Olive export of Qwen2.5-VL does. TensorRT cannot build
such a loop (its carried output grows), so this form is only written for files that say they are
for ONNX Runtime (`--runtime onnxruntime`).

Each iteration attends one piece of one segment: at most `LOOP_QUERY_ROWS` query rows against all
of that segment's keys, so that a single large image never holds its whole [L, L] score matrix
(the memory reason the dense form attends in query slices, `ops.QUERY_CHUNKS`). Segments are the
runs of equal ids in `segment_q` and `segment_k`, in ascending order on both sides (what
`ipcv::grid_layout` gives, and what pruning keeps: kept tokens stay in ascending order).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from onnxscript import FLOAT, INT64, script
from onnxscript import opset18 as op

LOOP_QUERY_ROWS = 2048
"""Query rows per loop iteration: the largest score block is [heads, 2048, L_k] (16 heads, L_k =
16384: 2 GB in fp32), against [heads, N / 4, N] for the dense form's slices."""


def loop_attention(query_rows: int) -> Callable:
    """The onnxscript function that lowers `ipcv::segment_loop_attention`: query [B, H, Nq, d],
    key/value [B, H, Nk, d], segment ids [Nq] and [Nk] -> [B, Nq, H, d]."""

    @script()
    def segment_loop_attention(query: FLOAT["B", "H", "Nq", "D"], key: FLOAT["B", "H", "Nk", "D"],
                               value: FLOAT["B", "H", "Nk", "D"], segment_q: INT64["Nq"], segment_k: INT64["Nk"],
                               scale: float) -> FLOAT["B", "Nq", "H", "D"]:
        zero = op.Constant(value_int=0)
        one = op.Constant(value_int=1)
        rows = op.Constant(value_int=query_rows)
        count = op.Add(op.Max(op.ReduceMax(segment_q, keepdims=0), op.ReduceMax(segment_k, keepdims=0)), one)
        ids = op.Unsqueeze(op.Range(zero, count, one), [0])
        length_q = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(segment_q, [1]), ids), to=7), [0], keepdims=0)
        length_k = op.ReduceSum(op.Cast(op.Equal(op.Unsqueeze(segment_k, [1]), ids), to=7), [0], keepdims=0)
        # each segment's end, at most the token count: the Min never acts, but it keeps the ends (and
        # the rows sliced from them) provably within int32 for the export's check (lower/int32_check.py)
        end_q = op.Min(op.CumSum(length_q, zero), op.Shape(segment_q))
        end_k = op.Min(op.CumSum(length_k, zero), op.Shape(segment_k))
        pieces = op.Div(op.Sub(op.Add(length_q, rows), one), rows)  # ceil(L_q / rows); 0 for no queries
        pieces_end = op.CumSum(pieces, zero)
        multiplier = op.CastLike(scale, query)
        out = op.Slice(query, [0], [0], [2])  # [B, H, 0, d], grown by one piece per iteration
        for piece in range(op.ReduceSum(pieces, keepdims=0)):
            segment = op.ReduceSum(op.Cast(op.LessOrEqual(pieces_end, piece), to=7), keepdims=1)
            first_piece = op.Sub(op.Gather(pieces_end, segment), op.Gather(pieces, segment))
            length = op.Gather(length_q, segment)
            # the piece's first row in its segment, below its length (a Min that never acts, as above)
            offset = op.Min(op.Mul(op.Sub(piece, first_piece), rows), length)
            start = op.Add(op.Sub(op.Gather(end_q, segment), length), offset)
            stop = op.Min(op.Add(start, rows), op.Gather(end_q, segment))
            key_stop = op.Gather(end_k, segment)
            key_start = op.Sub(key_stop, op.Gather(length_k, segment))
            keys = op.Slice(key, key_start, key_stop, [2])
            scores = op.Mul(op.MatMul(op.Slice(query, start, stop, [2]), op.Transpose(keys, perm=[0, 1, 3, 2])),
                            multiplier)
            weights = op.Softmax(scores, axis=-1)
            out = op.Concat(out, op.MatMul(weights, op.Slice(value, key_start, key_stop, [2])), axis=2)
        return op.Transpose(out, perm=[0, 2, 1, 3])

    return segment_loop_attention


def translation_table() -> dict:
    """torch.onnx's `custom_translation_table` entry for the op, at LOOP_QUERY_ROWS as it is now."""
    return {torch.ops.ipcv.segment_loop_attention.default: loop_attention(LOOP_QUERY_ROWS)}
