"""Fixtures of the LLM-side tests: the tiny chat models, built once per session."""

from __future__ import annotations

import pytest

from ipcv_export.llm.chat_models import ChatModel, load_chat_model

CHAT_MODELS = ["tiny-qwen2-vl-chat", "tiny-qwen2.5-vl-chat"]


@pytest.fixture(scope="session", params=CHAT_MODELS)
def chat(request) -> ChatModel:
    return load_chat_model(request.param)


@pytest.fixture(scope="session")
def qwen2_chat() -> ChatModel:
    return load_chat_model("tiny-qwen2-vl-chat")
