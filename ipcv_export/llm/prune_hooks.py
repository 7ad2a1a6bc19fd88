"""IVC-Prune inside a stock transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL model, through forward hooks.

Attaching registers PyTorch hooks on the model, its language model and its decoder layers; nothing
in transformers is edited or subclassed, so `model(...)` and `model.generate(...)` keep working with
any attention backend whose mask is a tensor or None (eager, sdpa), with or without a cache.

During a prefill (a call that starts a sequence) the hook on layer k selects K of the first visual
span's L tokens (ivc-prune.md steps 2-5), then compacts (step 6): the hidden states, the masks and
rotary tables every later layer receives, and the caches of layers 0..k-1. Positions are gathered,
never renumbered. Later calls on the same cache see a compacted 2-D mask and a rope delta shifted by
S - S', so decoding continues at the unpruned positions (step 8). A recompute without cache of the
same prompt plus generated tokens reuses the prompt's kept set instead of selecting again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from ..config import UsageError, check_retention
from .selector import select_static

Selector = Callable[..., torch.Tensor]
QUERY_OFFSET = 2
"""delta of ivc-prune.md: the query rows start two tokens after the span (vision-end and the next)."""
LAYER_BY_DEPTH = {28: 16, 36: 22}
"""ivc-prune.md's pruning layer for the released depths (Qwen2-VL-2B/7B, Qwen2.5-VL-7B: 28; Qwen2.5-VL-3B: 36)."""


AUTHORS_SCORE_TYPES = ("qwen2_vl", "qwen2_5_vl")
"""Model types that keep the authors' IVC score (every frequency under every axis) for parity with
their code. Models their code never covered (Qwen3-VL) score the rotation their attention applies,
read from the model (`rotary_axes`)."""


def default_prune_layer(num_layers: int, deepstack_layers: int = 0) -> int:
    """k: the released models' value, otherwise max(1, min(N_L - 1, 4 N_L // 7)); never before the
    last layer that DeepStack adds visual features after (they are added to the unpruned span)."""
    return max(deepstack_layers, LAYER_BY_DEPTH.get(num_layers, max(1, min(num_layers - 1, (4 * num_layers) // 7))))


def rotary_axes(rotary: torch.nn.Module) -> torch.Tensor:
    """[d/2] the M-RoPE axis (0 t, 1 h, 2 w) each rotary frequency turns by in the model's attention,
    read off its own rotary module: token a at position 1 on axis a alone turns only that axis's
    frequencies. UsageError for a rotary module that leaves the layout to the attention."""
    probe = torch.eye(3, dtype=torch.int64)[:, None, :]  # [3 axes, batch 1, 3 tokens]
    with torch.no_grad():
        _, sin = rotary(torch.zeros(1, dtype=torch.float32), probe)
    if sin.ndim != 3:
        raise UsageError(f"{type(rotary).__name__} does not compose the M-RoPE layout; IVC-Prune cannot read it")
    half = sin.shape[-1] // 2
    return sin[0, :, :half].abs().argmax(0)


@dataclass(frozen=True)
class PruneRecord:
    """What the last prefill did: sequence lengths before/after and the visual span's counts."""

    sequence: int  # S
    span_start: int  # a
    visual: int  # L
    kept_visual: int  # K
    layer: int  # k

    @property
    def sequence_after(self) -> int:
        return self.sequence - self.visual + self.kept_visual


@dataclass
class _Decision:
    prompt: torch.Tensor  # [S] token ids the kept set was chosen for
    keep: torch.Tensor  # [S'] ascending indices into the prompt


@dataclass
class _Call:
    """State of one forward call that starts a sequence and prunes it."""

    ids: torch.Tensor  # [S] the sequence's token ids
    span: tuple[int, int]  # (a, L)
    keep: torch.Tensor | None = None  # [rows kept] once known; None until layer k selects
    positions: torch.Tensor | None = None  # [3, S] M-RoPE positions
    values: torch.Tensor | None = None  # [S, H_kv, d] layer k-1's values
    cached: bool = False  # whether a cache was compacted (later calls decode from it)
    hidden_from_new: tuple[int, torch.Tensor] | None = None  # (P, removed prompt indices) in a recompute


class IvcPrune:
    """Attach IVC-Prune to a loaded model: `with IvcPrune(model, retention=0.5): model.generate(...)`.

    `selector` picks the kept visual tokens; the default is the static-shape selector that exported
    runtimes use, and `selection_reference.select_reference` is the plain definition.
    """

    def __init__(self, model: torch.nn.Module, retention: float = 0.5, layer: int | None = None,
                 query_offset: int = QUERY_OFFSET, selector: Selector = select_static):
        text = model.config.get_text_config()
        self.model = model
        self.layers = model.model.language_model.layers
        if not all(hasattr(layer, "self_attn") for layer in self.layers):
            raise UsageError("IVC-Prune needs softmax attention in every LLM layer, and this model's language model "
                             "has linear-attention layers (Qwen3.5); serve it unpruned with --format ort-genai")
        deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or ())
        self.layer = default_prune_layer(len(self.layers), deepstack) if layer is None else layer
        if not max(1, deepstack) <= self.layer < len(self.layers):
            raise UsageError(f"LLM pruning layer must be in [{max(1, deepstack)}, {len(self.layers) - 1}], got {self.layer}"
                             + (f" (DeepStack adds visual features after layers 0-{deepstack - 1})" if deepstack else ""))
        self.retention_e4 = check_retention(retention, "LLM retention")
        self.query_offset = query_offset
        self.selector = selector
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        self.kv_heads = text.num_key_value_heads
        self.rope_theta = float(text.rope_parameters["rope_theta"])
        self.axes = None if model.config.model_type in AUTHORS_SCORE_TYPES else rotary_axes(model.model.language_model.rotary_emb)
        self.visual_ids = (model.config.image_token_id, model.config.video_token_id)
        self.vision_start_id = model.config.vision_start_token_id
        self.last: PruneRecord | None = None
        self._decision: _Decision | None = None
        self._call: _Call | None = None
        self._handles: list = []

    def __enter__(self) -> IvcPrune:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def attach(self) -> IvcPrune:
        if self._handles:
            return self
        hooks = [self.model.register_forward_pre_hook(self._start_call, with_kwargs=True),
                 self.model.register_forward_hook(self._end_call),
                 self.model.model.language_model.register_forward_pre_hook(self._read_positions, with_kwargs=True),
                 self.layers[self.layer - 1].self_attn.v_proj.register_forward_hook(self._read_values)]
        hooks += [layer.register_forward_pre_hook(self._hide_removed_from_new_tokens, with_kwargs=True)
                  for layer in self.layers[:self.layer]]
        hooks += [layer.register_forward_pre_hook(self._compact_layer_inputs, with_kwargs=True)
                  for layer in self.layers[self.layer:]]
        self._handles = hooks
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles, self._call, self._decision = [], None, None

    # -- hooks ---------------------------------------------------------------------------------
    def _start_call(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        seen = cache.get_seq_length() if cache is not None else 0
        self._call = None
        if seen == 0:
            self._call = self._plan(input_ids)
        elif self._decision is not None and kwargs.get("attention_mask") is not None:
            new_tokens = input_ids.shape[1] if input_ids is not None else kwargs["inputs_embeds"].shape[1]
            kwargs["attention_mask"] = self._compact_decode_mask(kwargs["attention_mask"], seen + new_tokens)
        return args, kwargs

    def _read_positions(self, module, args, kwargs):
        if self._call is not None and self._call.keep is None:
            positions = kwargs.get("position_ids")
            if positions is None or positions.ndim != 3:
                raise ValueError("IVC-Prune needs the model's 3-D M-RoPE positions; pass image_grid_thw "
                                 "and mm_token_type_ids as the processor returns them")
            self._call.positions = positions[-3:, 0]

    def _read_values(self, module, args, output):
        if self._call is not None and self._call.keep is None:
            self._call.values = output[0].reshape(output.shape[1], self.kv_heads, self.head_dim)

    def _hide_removed_from_new_tokens(self, layer, args, kwargs):
        """In a recompute of prompt + generated tokens, the generated tokens must not see the removed
        prompt tokens in layers 0..k-1 either: with a cache they were never there (step 6)."""
        if self._call is None or self._call.hidden_from_new is None:
            return None
        prompt, removed = self._call.hidden_from_new
        mask = kwargs.get("attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        if mask is None:
            length = hidden.shape[1]
            mask = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
        _require_tensor_mask(mask)
        blocked = torch.zeros(mask.shape[-2:], dtype=torch.bool, device=mask.device)
        blocked[prompt:, removed] = True
        if mask.dtype == torch.bool:
            kwargs["attention_mask"] = mask & ~blocked
        else:
            kwargs["attention_mask"] = mask.masked_fill(blocked, torch.finfo(mask.dtype).min)
        return args, kwargs

    def _compact_layer_inputs(self, layer, args, kwargs):
        call = self._call
        if call is None:
            return None
        if layer is self.layers[self.layer]:
            if call.keep is None:
                self._select(call)
            if kwargs.get("past_key_values") is not None:
                self._compact_cache(kwargs["past_key_values"], call.keep)
                call.cached = True
            if args:
                args = (args[0].index_select(1, call.keep), *args[1:])
            else:
                kwargs["hidden_states"] = kwargs["hidden_states"].index_select(1, call.keep)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            _require_tensor_mask(mask)
            kwargs["attention_mask"] = mask.index_select(-2, call.keep).index_select(-1, call.keep)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"].index_select(-1, call.keep)
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos.index_select(-2, call.keep), sin.index_select(-2, call.keep))
        return args, kwargs

    def _end_call(self, module, args, output):
        call, self._call = self._call, None
        if call is not None and call.cached and getattr(self.model.model, "rope_deltas", None) is not None:
            self.model.model.rope_deltas = self.model.model.rope_deltas + (call.ids.shape[0] - call.keep.shape[0])

    # -- steps ---------------------------------------------------------------------------------
    def _plan(self, input_ids: torch.Tensor | None) -> _Call | None:
        """The pruning plan of a call that starts a sequence, or None when it is not pruned."""
        if input_ids is None:
            raise ValueError("IVC-Prune needs input_ids to find the visual span (inputs_embeds alone do not say)")
        if input_ids.shape[0] != 1:
            raise ValueError(f"IVC-Prune runs one request at a time (batch 1), got batch {input_ids.shape[0]}")
        ids = input_ids[0]
        span = self._visual_span(ids)
        if span is None:
            self.last = None  # this prefill pruned nothing; an older record would misreport it
            return None
        call = _Call(ids=ids, span=span)
        prompt = None if self._decision is None else self._decision.prompt
        if prompt is not None and ids.shape[0] >= prompt.shape[0] and torch.equal(ids[:prompt.shape[0]], prompt):
            new = torch.arange(prompt.shape[0], ids.shape[0], device=ids.device)
            call.keep = torch.cat([self._decision.keep, new])
            if new.numel():
                removed = torch.ones(prompt.shape[0], dtype=torch.bool, device=ids.device)
                removed[self._decision.keep] = False
                call.hidden_from_new = (prompt.shape[0], removed.nonzero()[:, 0])
        else:
            self._decision = None
            start, visual = span
            if start + visual + self.query_offset >= ids.shape[0]:
                raise ValueError("IVC-Prune needs prompt tokens after the image to score it against: the prompt "
                                 f"ends {ids.shape[0] - start - visual} token(s) after the visual span "
                                 f"(at least {self.query_offset + 1} needed; apply the chat template with "
                                 "add_generation_prompt=True)")
        return call

    def _visual_span(self, ids: torch.Tensor) -> tuple[int, int] | None:
        """(a, L) of the pad tokens right after the first vision-start token, or None."""
        starts = (ids == self.vision_start_id).nonzero()
        if starts.numel() == 0:
            return None
        start = int(starts[0, 0]) + 1
        is_visual = (ids[start:, None] == torch.tensor(self.visual_ids, device=ids.device)).any(-1)
        visual = int(is_visual.int().cumprod(0).sum())
        return (start, visual) if visual else None

    def _select(self, call: _Call) -> None:
        start, visual = call.span
        span = slice(start, start + visual)
        kept = self.selector(call.positions[:, span], call.values[span], call.values[start + visual + self.query_offset:],
                             self.retention_e4, self.head_dim, self.rope_theta, self.axes).to(call.values.device)
        device = kept.device
        call.keep = torch.cat([torch.arange(start, device=device), start + kept,
                               torch.arange(start + visual, call.ids.shape[0], device=device)])
        record = PruneRecord(call.ids.shape[0], start, visual, kept.shape[0], self.layer)
        self._decision = _Decision(call.ids.clone(), call.keep)
        self.last = record
        call.values = None

    def _compact_cache(self, cache, keep: torch.Tensor) -> None:
        if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise NotImplementedError(f"IVC-Prune compacts a full-attention DynamicCache only, got {type(cache).__name__}")
        for layer in cache.layers[: self.layer]:
            layer.keys = layer.keys.index_select(-2, keep)
            layer.values = layer.values.index_select(-2, keep)

    def _compact_decode_mask(self, mask: torch.Tensor, cached_and_new: int) -> torch.Tensor:
        """Drop the removed prompt tokens' columns from a 2-D mask that still counts them
        (as `generate` builds it); a mask that already matches the cache is left alone."""
        decision = self._decision
        prompt = decision.prompt.shape[0]
        if mask.ndim != 2 or mask.shape[-1] != cached_and_new + prompt - decision.keep.shape[0]:
            return mask
        tail = torch.arange(prompt, mask.shape[-1], device=mask.device)
        return mask.index_select(-1, torch.cat([decision.keep.to(mask.device), tail]))


def _require_tensor_mask(mask) -> None:
    """The hooks index and edit 4-D mask tensors; flex attention's block masks cannot be."""
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        raise NotImplementedError("IVC-Prune edits tensor attention masks only (eager or sdpa attention)")
