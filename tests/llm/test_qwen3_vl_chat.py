"""Qwen3-VL on the language-model side (issue 35, item 6): the encoder file's DeepStack outputs
reach the LLM as the stock tower's do, and IVC-Prune scores the rotation Qwen3-VL's interleaved
M-RoPE applies, read off the model's own rotary module."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

from ipcv_export.config import UsageError
from ipcv_export.llm.chat_models import load_chat_model
from ipcv_export.llm.pipeline import Pipeline
from ipcv_export.llm.prune_hooks import IvcPrune, rotary_axes
from ipcv_export.llm.selection_reference import select_reference

from chat_fixtures import greedy, image_inputs, qwen3_chat  # noqa: F401 (fixtures)

PROMPT = "What is in the picture?"


def photo(seed: int, size: tuple[int, int]) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def unpruned():
    """The pipeline at rho = 1 and rho_llm = 1: the tiny Qwen3-VL chat model with its encoder file."""
    return Pipeline("tiny-qwen3-vl-chat", retention=1.0, llm_retention=1.0, report=lambda _: None)


@pytest.mark.parametrize("sizes", [[(160, 112)], [(160, 112), (96, 64)]], ids=["one-image", "two-images"])
def test_unpruned_pipeline_generates_the_stock_tokens(unpruned, sizes):
    images = [photo(seed, size) for seed, size in enumerate(sizes)]
    result = unpruned.generate(images, PROMPT, max_new_tokens=10)
    stock = load_chat_model("tiny-qwen3-vl-chat")
    pixel_values, grid = unpruned.preprocess(images)
    ids = stock.prompt_ids(PROMPT, grid)
    out = stock.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                               image_grid_thw=grid, mm_token_type_ids=(ids == stock.model.config.image_token_id).int(),
                               max_new_tokens=10, do_sample=False)
    assert unpruned.tower.taps == 3
    assert result.new_token_ids == out[0, ids.shape[1]:].tolist()
    assert result.visual_tokens == int(grid.prod(-1).sum()) // 4 == result.llm_visual_kept


def test_deepstack_outputs_reach_the_llm(unpruned):
    """Guards the test above: the file's DeepStack outputs change what the LLM predicts."""
    pixel_values, grid = unpruned.preprocess([photo(0, (160, 112))])
    ids = unpruned.chat.prompt_ids(PROMPT, grid)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixel_values,
              "image_grid_thw": grid, "mm_token_type_ids": (ids == unpruned.chat.model.config.image_token_id).int()}
    with_taps = greedy(unpruned.chat.model, inputs, steps=1).logits[0]
    unpruned.tower.taps = 0
    try:
        without = greedy(unpruned.chat.model, inputs, steps=1).logits[0]
    finally:
        unpruned.tower.taps = 3
    assert (with_taps - without).abs().max().item() > 1e-2


def test_rotary_layout_is_read_off_the_model():
    """The tiny model's [4, 2, 2] and the released [24, 20, 20] sections, interleaved t h w t h w ...
    until h and w run out; Qwen2.5-VL's module gives its contiguous [16, 24, 24] sections; a module
    that returns per-axis tables (the layout left to the attention) is refused."""
    tiny = rotary_axes(load_chat_model("tiny-qwen3-vl-chat").model.model.language_model.rotary_emb)
    assert tiny.tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    released = Qwen3VLTextConfig(head_dim=128, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    axes = rotary_axes(Qwen3VLTextRotaryEmbedding(released))
    assert torch.bincount(axes).tolist() == [24, 20, 20]
    assert axes[:60].tolist() == [0, 1, 2] * 20 and axes[60:].tolist() == [0] * 4
    sectioned = Qwen2_5_VLTextConfig(hidden_size=128, num_attention_heads=1, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    assert rotary_axes(Qwen2_5_VLRotaryEmbedding(sectioned)).tolist() == [0] * 16 + [1] * 24 + [2] * 24

    class PerAxisTables(torch.nn.Module):
        def forward(self, x, position_ids):
            angles = position_ids[..., None].float() * torch.ones(8)
            return angles.cos(), angles.sin()  # [3, batch, tokens, d/2]: one table per axis

    with pytest.raises(UsageError, match="does not compose the M-RoPE layout"):
        rotary_axes(PerAxisTables())


def test_hooks_select_with_the_models_layout(qwen3_chat):
    model = qwen3_chat.model
    captured = {}

    def recording(positions, visual, query, *rest):
        from ipcv_export.llm.selector import select_static
        captured["args"], captured["rest"] = (positions, visual, query), rest
        captured["kept"] = select_static(positions, visual, query, *rest)
        return captured["kept"]

    with IvcPrune(model, retention=0.35, selector=recording) as prune:
        model(**image_inputs(qwen3_chat, [[1, 10, 14]], seed=2))
    assert prune.layer == 3  # after the three layers DeepStack adds to
    assert captured["rest"][1:3] == (16, 5e6) and captured["rest"][3].tolist() == [0, 1, 2, 0, 1, 2, 0, 0]
    assert torch.equal(captured["kept"], select_reference(*captured["args"], *captured["rest"]))
    authors = select_reference(*captured["args"], *captured["rest"][:3])
    assert not torch.equal(authors, captured["kept"])  # the layout changes which tokens are kept


def test_pruning_changes_the_output(qwen3_chat):
    inputs = image_inputs(qwen3_chat, [[1, 12, 16]], seed=1)
    stock = greedy(qwen3_chat.model, inputs)
    with IvcPrune(qwen3_chat.model, retention=0.2):
        pruned = greedy(qwen3_chat.model, inputs)
    assert max((x - y).abs().max().item() for x, y in zip(pruned.logits, stock.logits)) > 1e-3


def test_layer_before_deepstack_is_refused(qwen3_chat):
    with pytest.raises(UsageError, match=r"in \[3, 5\], got 2 \(DeepStack adds visual features after layers 0-2\)"):
        IvcPrune(qwen3_chat.model, layer=2)
