"""The attention core as one graph node: `ipcv::segment_attention`.

transformers lets a model use an attention function registered with `AttentionInterface`. The one
registered here calls a custom op, so every block's attention core is a single node in the captured
graph whose arguments a pass can edit: queries from kept rows, keys and values from the rebuilt
sequence, and the segment ids of each side. Lowering replaces the node by its decomposition (a
masked scaled-dot-product attention), which ONNX and AOTInductor both understand: `decompose`
before AOTInductor, torch.onnx's own decomposition run for ONNX (`decomposed_by_onnx_export`).

The registered name contains "flash" on purpose: transformers' vision attention takes its packed
(varlen) code path only for such names (`is_flash_attention_requested`), and the other path splits
the sequence with `.tolist()`, which cannot be exported.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch._decomp
import torch.fx.experimental._config as fx_config
from transformers import AttentionInterface

from .inputs import decomposed_grid_layout, decomposed_valid_tokens
from .tokens import row_chunks

ATTENTION_NAME = "ipcv_flash_segments"


QUERY_CHUNKS = 4
"""The decomposition attends in this many slices of the queries, so no [heads, Nq, Nk] tensor
exists at once, only [heads, Nq / 4, Nk] ones. Measured on the 7B-shape tower at N = 8192
(benchmarks/memory.py, ONNX Runtime CPU): 9.4 GB peak with 4 slices, killed above 23 GB without.
The peak still holds several slice-sized intermediates of the decomposition (scores, scaled,
masked, soft-maxed), so more slices buy less than their count suggests, and each costs export
time (onnxscript's rewriter matches every node): 8 slices took the 7B-shape ONNX lowering from
42 s to 266 s, 4 slices to 121 s."""


@torch.library.custom_op("ipcv::segment_attention", mutates_args=())
def segment_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      segment_q: torch.Tensor | None, segment_k: torch.Tensor | None, scale: float,
                      span: int | None = None, query_chunks: int = QUERY_CHUNKS,
                      segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """Attention in which query i sees key j only when segment_q[i] == segment_k[j].

    query [B, H, Nq, d], key/value [B, H, Nk, d], segment_q [Nq], segment_k [Nk] -> [B, Nq, H, d]
    (the layout transformers' attention functions return). Packed towers (B = 1) give segments;
    batched towers give None: each batch entry is one image, and every query sees every key;
    padded towers give [B, Nq] and [B, Nk] ids per image (1 real patch, 0 padding), so that no real
    query sees padding.
    `span`: every segment is one contiguous run of at most `span` tokens, on both sides of one
    sequence (Nq == Nk); the decomposition then attends in a band (`_banded_attention`), linear in N.
    `query_chunks`: otherwise the decomposition attends in this many slices of the queries
    (`_masked_attention`; QUERY_CHUNKS unless the tower asks for more). `segment_rows`: the call's
    `image_grid_thw` (only its row count is read), for the TensorRT form (`_attention_for_tensorrt`).
    """
    return _attention(query, key, value, segment_q, segment_k, scale, span, query_chunks)


@segment_attention.register_fake
def _segment_attention_fake(query, key, value, segment_q, segment_k, scale, span=None, query_chunks=QUERY_CHUNKS,
                            segment_rows=None):
    return query.new_empty(query.shape[0], query.shape[2], query.shape[1], value.shape[3])


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_q: torch.Tensor | None,
               segment_k: torch.Tensor | None, scale: float, span: int | None = None,
               query_chunks: int = QUERY_CHUNKS, segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The decomposition: banded where segments are short runs, else dense and masked."""
    if span is None:
        return _masked_attention(query, key, value, segment_q, segment_k, scale, query_chunks)
    return _banded_attention(query, key, value, segment_q, segment_k, scale, span)


BAND_TILES = 3
"""Each tile of `span` queries sees this many tiles of keys: its own and one either side. A run of
at most `span` tokens covers at most two adjacent tiles, so every key of a query's run is there."""


def band_rows(tokens: int | torch.SymInt, span: int) -> int | torch.SymInt:
    """Query rows the band computes: N rounded up to whole tiles (each sees BAND_TILES * span keys)."""
    return (tokens + span - 1) // span * span


def _banded_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_q: torch.Tensor,
                      segment_k: torch.Tensor, scale: float, span: int) -> torch.Tensor:
    """Exact segment attention for runs of at most `span` tokens, at N x 3 span pairs instead of N^2.

    The sequence is padded to whole tiles of `span` rows; tile t's queries attend to key tiles
    t-1, t, t+1 (zero tiles beyond the ends), masked by segment id. Padding rows carry id -1, which
    no real token has: they see only each other (no empty softmax row) and are cut off at the end.
    All shapes follow from N: Pad, Reshape, Slice, Concat, one SDPA over [B * tiles] 4-D blocks.
    """
    batch, n = query.shape[0], query.shape[2]
    rows = band_rows(n, span)
    tiles = rows // span

    def tiled(x: torch.Tensor, before: int, after) -> torch.Tensor:  # [B, H, N, d] -> [B * tiles(+2), H, span, d]
        padded = torch.nn.functional.pad(x, (0, 0, before, after))
        return padded.unflatten(2, (padded.shape[2] // span, span)).transpose(1, 2).flatten(0, 1)

    def neighbourhood(x: torch.Tensor, axis: int, rows_axis: int) -> torch.Tensor:  # tiles + 2 -> tiles, 3 span rows
        return torch.cat([x.narrow(axis, shift, tiles) for shift in range(BAND_TILES)], rows_axis)

    q = tiled(query, 0, rows - n)
    k, v = (neighbourhood(tiled(x, span, rows - n + span).unflatten(0, (batch, tiles + 2)), 1, 3).flatten(0, 1)
            for x in (key, value))
    pad_ids = functools.partial(torch.nn.functional.pad, value=-1)
    ids_q = pad_ids(segment_q, (0, rows - n)).reshape(tiles, 1, span, 1)
    ids_k = neighbourhood(pad_ids(segment_k, (span, rows - n + span)).reshape(tiles + 2, 1, span), 0, 2)
    mask = (ids_q == ids_k.unsqueeze(2)).repeat(batch, 1, 1, 1)  # [B * tiles, 1, span, 3 span]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=additive(mask, q.dtype), scale=scale)
    # [B * tiles, H, span, d] -> [B, rows, H, d] as one 4-D Transpose and one Reshape: OpenVINO's CPU
    # plugin fails to compile a Reshape -> 5-D Transpose -> Reshape with a dynamic tile count
    # (ShuffleChannelsFusion asks a dynamic dimension's length; serving-runtimes.md, OpenVINO)
    return out.transpose(1, 2).flatten(0, 1).unflatten(0, (batch, -1)).narrow(1, 0, n)


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask as the bias torch.onnx turns it into (0 where attended, the dtype's
    lowest value elsewhere), given as such: the same softmax, without the NaN guard (IsNaN and Where
    over every score) that torch.onnx writes after a boolean-masked softmax. No row here is fully
    masked (every query sees itself; a band's padding rows see each other), so the guard never
    acts; it cost about 12 % of a Qwen2.5-VL file's time (BENCHMARKS.md)."""
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device),
                       torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def _masked_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      segment_q: torch.Tensor | None, segment_k: torch.Tensor | None, scale: float,
                      chunks: int = QUERY_CHUNKS) -> torch.Tensor:
    queries = row_chunks(query, chunks, dim=2)
    masks = ([None] * chunks if segment_q is None
             else [_per_head(additive(seg.unsqueeze(-1) == segment_k.unsqueeze(-2), query.dtype))
                   for seg in row_chunks(segment_q, chunks, dim=-1)])
    out = [torch.nn.functional.scaled_dot_product_attention(q, key, value, attn_mask=mask, scale=scale)
           for q, mask in zip(queries, masks)]
    return torch.cat(out, 2).transpose(1, 2)


def _per_head(mask: torch.Tensor) -> torch.Tensor:
    """A [Nq, Nk] mask as it is (one for the whole call), a [B, Nq, Nk] one (per image) as
    [B, 1, Nq, Nk], broadcast over the heads."""
    return mask if mask.ndim == 2 else mask.unsqueeze(1)


ATTENTION_FORMS = ("portable", "onnxruntime", "tensorrt")
"""How a file's attention over several segments is written. `portable`: static-shaped operators
every runtime takes (TensorRT included): bands where segments are short runs, else a dense product
masked by segment. `onnxruntime`: the dense case becomes `ipcv::segment_loop_attention`, an ONNX
Loop over segments (lower/segment_loop.py) that pays the sum of L_q * L_k over segments.
`tensorrt`: the dense case becomes a choice (ONNX If) between a batch of the call's S rows and the
dense product (`_attention_for_tensorrt`)."""


@torch.library.custom_op("ipcv::segment_loop_attention", mutates_args=())
def segment_loop_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, segment_q: torch.Tensor,
                           segment_k: torch.Tensor, scale: float) -> torch.Tensor:
    """Segment attention to be written as a loop over segments (only torch.onnx lowers it, through
    `lower.segment_loop.translation_table`); eagerly, the same result by the masked form."""
    return _masked_attention(query, key, value, segment_q, segment_k, scale, 1)


@segment_loop_attention.register_fake
def _segment_loop_attention_fake(query, key, value, segment_q, segment_k, scale):
    return _segment_attention_fake(query, key, value, segment_q, segment_k, scale)


def _attention_for_onnxruntime(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                               segment_q: torch.Tensor | None, segment_k: torch.Tensor | None, scale: float,
                               span: int | None = None, query_chunks: int = QUERY_CHUNKS,
                               segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The `onnxruntime` form's decomposition: segments of a packed call that are not short runs
    attend in a loop (a padded tower's per-image ids keep the masked product: its images are a batch)."""
    if span is None and segment_q is not None and segment_q.ndim == 1:
        return torch.ops.ipcv.segment_loop_attention(query, key, value, segment_q, segment_k, scale)
    return _attention(query, key, value, segment_q, segment_k, scale, span, query_chunks)


def _attention_for_tensorrt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            segment_q: torch.Tensor | None, segment_k: torch.Tensor | None, scale: float,
                            span: int | None = None, query_chunks: int = QUERY_CHUNKS,
                            segment_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The `tensorrt` form's decomposition. TensorRT builds no loop whose sizes come from tensor
    values, but sizes that follow from input shapes are fine: when the segments on both sides are
    the S rows of `image_grid_thw` in equal runs (equal images, or a video passed as t rows of
    [1, h, w], which the stock towers compute identically), attention is a batch of S segments and
    costs the sum of L_q * L_k; otherwise the dense masked product, as TensorRT-LLM's own vision
    encoders attend. The choice is made per call, in the graph (torch.cond: ONNX If)."""
    if span is not None or segment_q is None or segment_q.ndim != 1 or segment_rows is None:
        return _attention(query, key, value, segment_q, segment_k, scale, span, query_chunks)
    def by_segment(q, k, v, grid, *_segments):
        return _batched_segments(q, k, v, grid.shape[0], scale, query_chunks)

    def dense(q, k, v, _grid, *segments):
        return _masked_attention(q, k, v, segments[0], segments[-1], scale, query_chunks).contiguous()

    equal = _runs_mismatch(segment_q, segment_rows.shape[0]) + _runs_mismatch(segment_k, segment_rows.shape[0]) == 0
    segments = (segment_q,) if segment_k is segment_q else (segment_q, segment_k)  # one operand per graph value
    # the higher-order op itself: the torch.cond wrapper compiles the branches with dynamo, which
    # fails inside a decomposition (this function only ever runs while torch.onnx traces)
    return torch.ops.higher_order.cond(equal, by_segment, dense, (query, key, value, segment_rows, *segments))


def _runs_mismatch(segment: torch.Tensor, rows: int | torch.SymInt) -> torch.Tensor:
    """0 exactly when the ids are 0..rows-1 in `rows` contiguous runs of one length (ids equal to
    i // (n // rows) end at rows - 1 only when rows divides n); integer arithmetic throughout,
    which TensorRT takes where it refuses Equal and Clip on booleans and integers."""
    n = segment.shape[0]
    length = torch.maximum(torch.scalar_tensor(n // rows, dtype=segment.dtype, device=segment.device),
                           torch.ones((), dtype=segment.dtype, device=segment.device))
    expected = torch.div(torch.arange(n, dtype=segment.dtype, device=segment.device), length, rounding_mode="trunc")
    return (segment - expected).abs().sum() + (segment[-1] - (rows - 1)).abs()


def _batched_segments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rows: int | torch.SymInt,
                      scale: float, chunks: int) -> torch.Tensor:
    """Attention within each of `rows` equal runs: [B, H, N, d] -> [B * rows, H, N / rows, d] per side,
    no mask, -> [B, Nq, H, d]. Each side is padded to a multiple of `rows` first so that no shape
    needs N divisible by rows (the caller's check guarantees it; the padding is then empty)."""
    batch, n = query.shape[0], query.shape[2]

    def by_row(x: torch.Tensor) -> torch.Tensor:
        length = (x.shape[2] + rows - 1) // rows
        padded = torch.nn.functional.pad(x, (0, 0, 0, rows * length - x.shape[2]))
        return padded.unflatten(2, (rows, length)).transpose(1, 2).contiguous().flatten(0, 1)

    # contiguous before each reshape: the decomposed program's views follow the traced strides,
    # which need not be those the CPU attention kernel returns
    out = _masked_attention(by_row(query), by_row(key), by_row(value), None, None, scale, chunks).contiguous()
    return out.unflatten(0, (batch, rows)).flatten(1, 2).narrow(1, 0, n).clone(memory_format=torch.contiguous_format)


def decompositions(form: str = "portable") -> dict:
    """Decomposition table of the custom ops (segment_attention, grid_layout, valid_tokens) before
    lowering, for one of ATTENTION_FORMS."""
    if form not in ATTENTION_FORMS:
        raise ValueError(f"unknown attention form {form!r}; choose from {', '.join(ATTENTION_FORMS)}")
    attention = {"onnxruntime": _attention_for_onnxruntime, "tensorrt": _attention_for_tensorrt}.get(form, _attention)
    return {torch.ops.ipcv.segment_attention.default: attention,
            torch.ops.ipcv.grid_layout.default: decomposed_grid_layout,
            torch.ops.ipcv.valid_tokens.default: decomposed_valid_tokens}


def decompose(program: torch.export.ExportedProgram) -> torch.export.ExportedProgram:
    """The program with every custom-op node replaced by its decomposition, traced with
    sizes treated as >= 2 as in capture (otherwise re-tracing SDPA records a guard that the
    number of images is not 1)."""
    with fx_config.patch(backed_size_oblivious=True):
        return program.run_decompositions(decompositions())


@contextlib.contextmanager
def decomposed_by_onnx_export(form: str = "portable") -> Iterator[None]:
    """Within: torch.onnx.export decomposes the custom ops itself, in the one re-trace of the
    program it makes anyway (its decomposition table is built from torch._decomp's), instead of
    `decompose` re-tracing the whole program once more first (18.2 s of the tiny tower's 112 s of
    profiled ONNX lowering, BENCHMARKS.md). Scoped, not registered for good: torch.export consults
    the same table, so a capture would decompose the op before the passes could find it."""
    table = torch._decomp.decomposition_table
    ours = decompositions(form)
    table.update(ours)
    try:
        yield
    finally:
        for op in ours:
            table.pop(op, None)


def _attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        segment_ids=None, segment_span=None, query_chunks=QUERY_CHUNKS, segment_rows=None,
                        **kwargs):
    """transformers attention function: one segment_attention node, segments (and, where they are
    short contiguous runs such as windows, their longest length; where the tower asks for it, the
    query slices of dense attention; the call's image_grid_thw) from the caller."""
    if segment_ids is None:
        raise ValueError(f"attention '{ATTENTION_NAME}' needs segment_ids passed to the encoder's forward")
    return torch.ops.ipcv.segment_attention(query, key, value, segment_ids, segment_ids, scaling, segment_span,
                                            query_chunks, segment_rows), None


BATCHED_ATTENTION_NAME = "ipcv_batched"


def _batched_attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function for towers that batch whole images: one segment_attention
    node per block, no segments (a mask would mean padding, which these towers never have)."""
    if attention_mask is not None:
        raise ValueError(f"attention '{BATCHED_ATTENTION_NAME}' takes no attention mask")
    return torch.ops.ipcv.segment_attention(query, key, value, None, None, scaling), None


WHOLE_QUERIES_ATTENTION_NAME = "ipcv_batched_whole_queries"


def _whole_queries_attention_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                      **kwargs):
    """`_batched_attention_function` with every query in one slice: for a sequence whose length
    the exporter cannot bound below (mixed-resolution tokens: a sum of floors of the grid's
    sides), which it could not prove the slices of in range."""
    if attention_mask is not None:
        raise ValueError(f"attention '{WHOLE_QUERIES_ATTENTION_NAME}' takes no attention mask")
    return torch.ops.ipcv.segment_attention(query, key, value, None, None, scaling, None, 1), None


AttentionInterface.register(ATTENTION_NAME, _attention_function)
AttentionInterface.register(BATCHED_ATTENTION_NAME, _batched_attention_function)
AttentionInterface.register(WHOLE_QUERIES_ATTENTION_NAME, _whole_queries_attention_function)
