"""Switch a transformers module's attention to one of `ipcv_export.ops`' registered functions.

transformers reads `config._attn_implementation` at every call, so setting it for the duration of
a capture routes each block's attention through `ipcv::segment_attention` without touching the
module's code; the previous setting comes back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .. import ops


@contextlib.contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


def _tower_config(module):
    """The vision tower's own config, whose attention setting the tower reads (a LLaVA or Gemma 4
    module holds it as vision_config)."""
    return getattr(module.config, "vision_config", module.config)


def packed(module) -> contextlib.AbstractContextManager:
    """Packed towers: attention within segments (segment ids passed down the forward)."""
    return attention_implementation(module.config, ops.ATTENTION_NAME)


def batched(module) -> contextlib.AbstractContextManager:
    """Towers that batch whole images: attention within each image, no segments. The tower's own
    config is switched (a LLaVA module's config holds it as vision_config)."""
    return attention_implementation(_tower_config(module), ops.BATCHED_ATTENTION_NAME)


def batched_whole_queries(module) -> contextlib.AbstractContextManager:
    """`batched`, attending with all queries at once (`ops.WHOLE_QUERIES_ATTENTION_NAME`): for
    mixed-resolution tokens, whose sequence has about rho of the patches, so its [H, T, T] scores
    are about rho^2 of the stock tower's."""
    return attention_implementation(_tower_config(module), ops.WHOLE_QUERIES_ATTENTION_NAME)


def padded(module) -> contextlib.AbstractContextManager:
    """Towers whose images come as padded patch rows: attention within each image's real patches,
    by per-image token ids passed down the forward as segment_ids ([B, N]; the packed function
    takes them as they come). The tower's own config is switched, as for `batched`."""
    return attention_implementation(_tower_config(module), ops.ATTENTION_NAME)
