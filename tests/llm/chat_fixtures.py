"""The tiny chat models (built once per session) and their inputs as the stock processor builds them.

Imported by the test modules here rather than kept in a conftest.py: a second conftest module
would shadow the top-level one that other tests import helpers from."""

from __future__ import annotations

import pytest
import torch

from ipcv_export.llm.chat_models import ChatModel, load_chat_model

CHAT_MODELS = ["tiny-qwen2-vl-chat", "tiny-qwen2.5-vl-chat", "tiny-qwen3-vl-chat"]


@pytest.fixture(scope="session", params=CHAT_MODELS)
def chat(request) -> ChatModel:
    return load_chat_model(request.param)


@pytest.fixture(scope="session")
def qwen2_chat() -> ChatModel:
    return load_chat_model("tiny-qwen2-vl-chat")


@pytest.fixture(scope="session")
def qwen3_chat() -> ChatModel:
    return load_chat_model("tiny-qwen3-vl-chat")


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
