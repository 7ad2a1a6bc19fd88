"""IVC-Prune inside the stock transformers models: exactness at rho = 1, consistency of cache and
recompute after pruning, compaction of every layer's cache, and the refusals."""

from __future__ import annotations

import pytest
import torch

from ipcv_export.config import UsageError
from ipcv_export.llm.chat_models import load_chat_model
from ipcv_export.llm.prune_hooks import IvcPrune, default_prune_layer
from ipcv_export.llm.selection_reference import Counts, ivc_tokens, select_reference

from chat_fixtures import chat, greedy, image_inputs, qwen2_chat  # noqa: F401 (fixtures)

STOCK_TOLERANCE = 1e-5  # issue 6: logits at rho = 1 equal the stock model's
RECOMPUTE_TOLERANCE = 1e-4  # cache vs recompute: same arithmetic in a different order


def max_logit_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_retention_one_is_the_stock_model(chat, attention):
    chat.model.set_attn_implementation(attention)
    inputs = image_inputs(chat, [[1, 8, 12]])
    stock = greedy(chat.model, inputs)
    stock_recomputed = greedy(chat.model, inputs, use_cache=False)
    with IvcPrune(chat.model, retention=1.0) as prune:
        pruned = greedy(chat.model, inputs)
        recomputed = greedy(chat.model, inputs, use_cache=False)
    chat.model.set_attn_implementation("sdpa")
    assert prune.last.kept_visual == prune.last.visual == 24
    assert torch.equal(pruned.sequences, stock.sequences)
    assert torch.equal(recomputed.sequences, stock_recomputed.sequences)
    assert max_logit_diff(pruned, stock) <= STOCK_TOLERANCE
    assert max_logit_diff(recomputed, stock_recomputed) <= STOCK_TOLERANCE


@pytest.mark.parametrize("retention", [0.5, 0.35, 0.2])
def test_cache_and_recompute_agree_after_pruning(chat, retention):
    inputs = image_inputs(chat, [[1, 12, 16]], seed=1)
    with IvcPrune(chat.model, retention=retention) as prune:
        cached = greedy(chat.model, inputs, steps=8)
        record = prune.last
        recomputed = greedy(chat.model, inputs, steps=8, use_cache=False)
    assert record.kept_visual == Counts.of(48, round(retention * 1e4)).budget
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert max_logit_diff(cached, recomputed) <= RECOMPUTE_TOLERANCE
    generated = cached.sequences.shape[1] - inputs["input_ids"].shape[1]
    lengths = {layer.keys.shape[-2] for layer in cached.past_key_values.layers}
    assert lengths == {record.sequence_after + generated - 1}  # the last token is not fed back


def test_pruning_changes_the_output(qwen2_chat):
    """Guards the tests above against a pruner that silently does nothing."""
    inputs = image_inputs(qwen2_chat, [[1, 12, 16]], seed=1)
    stock = greedy(qwen2_chat.model, inputs)
    with IvcPrune(qwen2_chat.model, retention=0.2):
        pruned = greedy(qwen2_chat.model, inputs)
    assert max_logit_diff(pruned, stock) > 1e-3


def test_hooks_select_what_the_reference_selects(qwen2_chat):
    model = qwen2_chat.model
    inputs = image_inputs(qwen2_chat, [[1, 10, 14]], seed=2)
    captured = {}
    with IvcPrune(model, retention=0.35, selector=_recording(captured)) as prune:
        model(**inputs)
    text = model.config.text_config
    expected = select_reference(*captured["args"], 3500, text.hidden_size // text.num_attention_heads, 1e6)
    assert torch.equal(captured["kept"], expected)
    assert prune.last.kept_visual == expected.shape[0]


def _recording(store: dict):
    from ipcv_export.llm.selector import select_static

    def select(positions, visual, query, *rest):
        store["args"] = (positions, visual, query)
        store["kept"] = select_static(positions, visual, query, *rest)
        return store["kept"]
    return select


def test_ivc_tokens_are_kept_whatever_the_pixels(qwen2_chat):
    model = qwen2_chat.model
    kept_sets, positions = [], {}
    for seed in (3, 4):
        store = {}
        with IvcPrune(model, retention=0.5, selector=_recording(store)):
            model(**image_inputs(qwen2_chat, [[1, 12, 12]], seed=seed))
        kept_sets.append(set(store["kept"].tolist()))
        positions[seed] = store["args"][0]
    assert torch.equal(positions[3], positions[4])
    text = model.config.text_config
    ivc = ivc_tokens(positions[3], Counts.of(36, 5000).ivc_per_kind, text.hidden_size // text.num_attention_heads, 1e6)
    assert ivc <= kept_sets[0] and ivc <= kept_sets[1]


def test_decoding_without_mask_continues_at_unpruned_positions(qwen2_chat):
    """A manual decode step from the pruned cache (no mask, no positions) equals a recompute."""
    model = qwen2_chat.model
    inputs = image_inputs(qwen2_chat, [[1, 8, 8]], seed=5)
    with IvcPrune(model, retention=0.5), torch.inference_mode():
        prefill = model(**inputs, use_cache=True)
        token = prefill.logits[:, -1:].argmax(-1)
        step = model(input_ids=token, past_key_values=prefill.past_key_values, use_cache=True)
        longer = dict(inputs, input_ids=torch.cat([inputs["input_ids"], token], 1))
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        longer["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token, dtype=torch.int32)], 1)
        full = model(**longer)
    assert (step.logits[0, -1] - full.logits[0, -1]).abs().max().item() <= RECOMPUTE_TOLERANCE


def test_text_only_prompt_is_not_pruned(qwen2_chat):
    ids = qwen2_chat.prompt_ids("Just text, no image.", torch.zeros(0, 3, dtype=torch.int64))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    stock = greedy(qwen2_chat.model, inputs)
    with IvcPrune(qwen2_chat.model, retention=0.5) as prune:
        pruned = greedy(qwen2_chat.model, inputs)
    assert prune.last is None
    assert torch.equal(pruned.sequences, stock.sequences) and max_logit_diff(pruned, stock) == 0.0


def test_record_describes_the_latest_prefill(qwen2_chat):
    ids = qwen2_chat.prompt_ids("Just text.", torch.zeros(0, 3, dtype=torch.int64))
    with IvcPrune(qwen2_chat.model, retention=0.5) as prune:
        qwen2_chat.model(**image_inputs(qwen2_chat, [[1, 8, 8]]))
        assert prune.last is not None and prune.last.visual == 16
        qwen2_chat.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        assert prune.last is None


def test_prompt_ending_at_the_image_is_refused(qwen2_chat):
    inputs = image_inputs(qwen2_chat, [[1, 4, 4]])
    end = int((inputs["input_ids"][0] == qwen2_chat.model.config.vision_end_token_id).nonzero()[0, 0]) + 2
    cut = {k: (v[:, :end] if k != "pixel_values" and k != "image_grid_thw" else v) for k, v in inputs.items()}
    with IvcPrune(qwen2_chat.model, retention=0.5), pytest.raises(ValueError, match="prompt tokens after the image"):
        qwen2_chat.model(**cut)


def test_bad_settings_and_batches_are_refused(qwen2_chat):
    with pytest.raises(UsageError, match="LLM retention"):
        IvcPrune(qwen2_chat.model, retention=0)
    with pytest.raises(UsageError, match="pruning layer"):
        IvcPrune(qwen2_chat.model, layer=4)
    inputs = image_inputs(qwen2_chat, [[1, 4, 4]])
    batch = {k: (torch.cat([v, v]) if k in ("input_ids", "attention_mask", "mm_token_type_ids") else v)
             for k, v in inputs.items()}
    with IvcPrune(qwen2_chat.model), pytest.raises(ValueError, match="batch 1"):
        qwen2_chat.model(**batch)


def test_default_layers_follow_the_definition():
    assert default_prune_layer(28) == 16 and default_prune_layer(36) == 22
    assert default_prune_layer(4) == 2 and default_prune_layer(2) == 1 and default_prune_layer(40) == 22
    assert default_prune_layer(4, deepstack_layers=3) == 3 and default_prune_layer(36, deepstack_layers=3) == 22


def test_a_language_model_with_linear_attention_is_refused():
    """Qwen3.5's LLM is mostly linear-attention layers, which have no attention scores to prune by."""
    with pytest.raises(UsageError, match=r"linear-attention layers \(Qwen3.5\); serve it unpruned with --format ort-genai"):
        IvcPrune(load_chat_model("tiny-qwen3.5-chat").model)
