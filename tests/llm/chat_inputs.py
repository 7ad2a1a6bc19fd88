"""Inputs for the tiny chat models as the stock processor would build them."""

from __future__ import annotations

import torch

from ipcv_export.llm.chat_models import ChatModel


def image_inputs(chat: ChatModel, grids: list[list[int]], question: str = "What is in it?", seed: int = 0) -> dict:
    """Model inputs for images of the given patch grids (seeded random pixels) and a question,
    in Qwen's chat template, as the stock processor would return them."""
    grid = torch.tensor(grids)
    config = chat.model.config.vision_config
    width = config.in_channels * config.temporal_patch_size * config.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), width, generator=torch.Generator().manual_seed(seed))
    ids = chat.prompt_ids(question, grid)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels,
            "image_grid_thw": grid, "mm_token_type_ids": (ids == chat.model.config.image_token_id).int()}


def greedy(model, inputs: dict, steps: int = 6, **kwargs):
    return model.generate(**inputs, max_new_tokens=steps, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, **kwargs)
