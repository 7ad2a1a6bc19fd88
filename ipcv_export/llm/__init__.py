"""The LLM side: IVC-Prune (docs/ivc-prune.md) for Qwen2-VL / Qwen2.5-VL language models.

`selection_reference` is the definition in plain tensor code; `selector` computes the same kept
set with static shapes for export; `prune_hooks` applies either inside a stock transformers model
during prefill and keeps generation consistent afterwards.
"""
