"""The families the tool knows (their descriptions, by architecture name) and their built-in configs."""

from __future__ import annotations

from pathlib import Path

from .description import ModelDescription
from .dinov2 import DINOV2
from .gemma4 import GEMMA4
from .internvl import INTERNVL_VIT
from .llava import LLAVA_CLIP, LLAVA_ONEVISION_SIGLIP
from .qwen2_5_vl import QWEN2_5_VL
from .qwen2_vl import QWEN2_VL
from .qwen3_vl import QWEN3_5, QWEN3_VL

ARCHITECTURES: dict[str, ModelDescription] = {d.architecture: d for d in (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, QWEN3_5, DINOV2, LLAVA_CLIP,
                                                                             LLAVA_ONEVISION_SIGLIP, INTERNVL_VIT, GEMMA4)}
CONFIG_DIR = Path(__file__).parent / "configs"
