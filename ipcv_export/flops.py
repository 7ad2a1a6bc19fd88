"""FLOPs of an exported program, counted on its graph with fake tensors.

`torch.utils.flop_counter` counts the matrix products (linear, conv, attention) that every
operator of the graph performs for inputs of a given N; fake tensors make this take a fraction of
a second at any N, with no memory for activations. Element-wise work is not counted (it is a small
share of a ViT and is bandwidth-bound, not compute-bound). The attention core counts its dense
[Nq, Nk] products, or its band's where segments are short runs (windows), which is what the
portable decomposition computes. Two counts on real inputs complete it for calls of several
segments: the call's FLOPs with attention priced segment by segment (`count_call`), and what
ONNX Runtime ran (`onnx_attention_flops`, from its profile).
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from . import ops
from .config import IpcvConfig
from .layouts import layout_of
from .models.encoder import LoadedEncoder
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
        inputs = layout_of(encoder).counting_inputs(encoder, tokens)
        with FlopCounterMode(display=False) as counter:
            module(*inputs)
    return counter.get_total_flops()


def floor_ratio(encoder: LoadedEncoder, config: IpcvConfig, tokens: int) -> float:
    """IPCV / original FLOPs by the family's cost model (`ModelDescription.flop_floor`), N = tokens."""
    floor, vision = encoder.description.flop_floor, encoder.module.config
    ipcv = floor(vision, config.retention_e4, config.prune_layer, config.as_depth, tokens, config.selection,
                 config.mixed_cell)
    return ipcv / floor(vision, RETENTION_SCALE, config.prune_layer, config.as_depth, tokens)


@dataclass(frozen=True)
class CallCount:
    """FLOPs of one real call of a program. `attention`: what its attention cores need segment by
    segment, L_q x L_k per segment in blocks that attend over whole segments (what the stock varlen
    kernels pay), the band in banded blocks (what the portable and the ONNX Runtime forms both
    compute there). `total`: every matrix product as `program_flops` counts it, attention priced
    so: what the cost model's `ModelDescription.call_flop_floor` must equal. `outputs`: the call's."""

    total: int
    attention: int
    outputs: tuple[torch.Tensor, ...]

    @property
    def kept_index(self) -> torch.Tensor:
        """The call's kept_index output (the second to last: features, kept_index, neighbor_index)."""
        return self.outputs[-2]


def count_call(program: torch.export.ExportedProgram, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> CallCount:
    """Run the program eagerly on one call and count it (CallCount): the segment lengths after
    pruning are values (the selection's), not shapes, so fake tensors cannot count them."""
    attention = _SegmentAttentionCounter()
    with torch.no_grad(), FlopCounterMode(display=False) as counter, attention:
        outputs = program.module()(pixel_values, grid_thw)
    return CallCount(counter.get_total_flops() - attention.dense_flops + attention.flops, attention.flops,
                     tuple(outputs))


def kept_per_slice(grid_thw: torch.Tensor, kept_index: torch.Tensor) -> list[tuple[int, int]]:
    """(patches, kept patches) of each temporal slice of a packed call, from a file's kept_index:
    the segments `call_flop_floor` prices (a windowed tower's window order keeps slices in place)."""
    lengths = [h * w for t, h, w in grid_thw.tolist() for _ in range(t)]
    slice_of = torch.bucketize(kept_index, torch.tensor(lengths).cumsum(0), right=True)
    return list(zip(lengths, torch.bincount(slice_of, minlength=len(lengths)).tolist()))


class _SegmentAttentionCounter(TorchDispatchMode):
    """Adds up, over every `ipcv::segment_attention` call it sees, that call's per-segment FLOPs
    (`flops`), and what the FLOP counter's formula charges for it from its shapes (`dense_flops`)."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = self.dense_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.ipcv.segment_attention.default:
            self.flops += _per_segment_flops(*args, **kwargs)
            query, key, value, *rest = args
            self.dense_flops += _segment_attention_flops(query.shape, key.shape, value.shape, *rest, **kwargs)
        return func(*args, **kwargs)


def _per_segment_flops(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_q: torch.Tensor | None,
                       segment_k: torch.Tensor | None, scale: float, span: int | None = None, *_args,
                       **_kwargs) -> int:
    if span is not None or segment_q is None:  # the band, or one image per batch entry: what the shapes say
        return _segment_attention_flops(query.shape, key.shape, value.shape, span=span)
    batch, heads, _, depth = query.shape
    count = int(max(segment_q.max(), segment_k.max())) + 1
    pairs = int((torch.bincount(segment_q, minlength=count) * torch.bincount(segment_k, minlength=count)).sum())
    return 2 * batch * heads * pairs * (depth + value.shape[3])


def onnx_attention_flops(path: str | Path, feeds: dict[str, np.ndarray]) -> int:
    """FLOPs of the attention products ONNX Runtime really ran for `feeds`: every MatMul (or fused
    MatMul) between two 4-D activations ([.., Lq, d] x [.., d, Lk] and [.., Lq, Lk] x [.., Lk, d]),
    read from its profile, loop iterations included. Projections multiply by 2-D weights and are
    not counted."""
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(folder) / "profile")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    flops = 0
    for event in events:
        arguments = event.get("args", {})
        if event.get("cat") != "Node" or "MatMul" not in arguments.get("op_name", ""):
            continue
        inputs = [next(iter(shape.values())) for shape in arguments.get("input_type_shape", [])]
        if len(inputs) < 2 or len(inputs[0]) != 4 or len(inputs[1]) != 4:
            continue
        output = next(iter(arguments["output_type_shape"][0].values()))
        inner = inputs[0][-1] if output[-2] == inputs[0][-2] else inputs[0][-2]  # transposed A (FusedMatMul)
        flops += 2 * math.prod(output) * inner
    return flops
