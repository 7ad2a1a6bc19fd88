"""The README's Python blocks run as a user pastes them: in order, in one namespace, in an empty
folder (they write encoder.onnx there)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2, "the README's Python examples moved: update this test"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    # what the first block promises: one embedding row per merged token, split per image
    grid = namespace["grid_thw"]
    assert namespace["embeddings"].shape[0] == int(grid.prod(-1).sum()) // 4
    for embedding, per_image in zip(namespace["embeddings"].split((grid.prod(-1) // 4).tolist()), namespace["per_image"]):
        torch.testing.assert_close(per_image, embedding, atol=0, rtol=0)
    assert namespace["result"].new_token_ids, "the pipeline generated no token"
