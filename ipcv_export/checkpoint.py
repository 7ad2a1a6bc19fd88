"""Load the vision tower of a Hugging Face checkpoint folder: safetensors only, vision keys only.

Only the tensors under the tower's prefix are read (safetensors maps each file and reads tensors
on demand), so a multimodal LLM's language weights never enter memory. Pickle files are never
opened: a folder with only `.bin` weights is refused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError  # transformers' config classes validate their fields
from safetensors import SafetensorError, safe_open

from .config import UsageError, first_line, read_json_object
from .models import ARCHITECTURES
from .models.encoder import LoadedEncoder


class CheckpointError(UsageError):
    """The folder is not a usable checkpoint; the message says why in one line."""


def load_checkpoint_encoder(folder: Path) -> LoadedEncoder:
    config = _read_config(folder)
    model_type = config.get("model_type")
    description = next((d for d in ARCHITECTURES.values() if model_type in d.model_types), None)
    if description is None:
        raise CheckpointError(f"{folder}: unsupported architecture {model_type!r} "
                              f"(supported: {', '.join(t for d in ARCHITECTURES.values() for t in d.model_types)})")
    # a vision-only checkpoint (e.g. a Dinov2Model folder) has the tower's config at the top level
    vision_config = config.get("vision_config", config if description.image_batch else None)
    if not isinstance(vision_config, dict):
        raise CheckpointError(f"{folder}/config.json has no vision_config")
    files = _weight_files(folder)
    try:
        module = description.build(config if description.whole_config else vision_config)
    except (TypeError, ValueError, AttributeError, KeyError, StrictDataclassError) as err:  # a field's type or value
        raise CheckpointError(f"{folder}/config.json does not describe a {model_type} vision tower "
                              f"({first_line(err)})") from None
    _check_heads(folder, getattr(module.config, "vision_config", module.config))
    names = {key.split(".")[0] for key in module.state_dict()}
    state = _read_vision_tensors(folder, files, description.weight_prefixes, names)
    not_float = next((key for key, tensor in state.items() if not tensor.is_floating_point()), None)
    if not_float:
        raise CheckpointError(f"{folder}: vision weight {not_float} is {state[not_float].dtype}, not floating point")
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape differs from the config's
        mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), first_line(err))
        raise CheckpointError(f"{folder}: vision weights do not match the config ({mismatch})") from None
    missing = [k for k in missing if "inv_freq" not in k]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: vision weights do not match the config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    encoder = LoadedEncoder(module, description, {"path": str(folder.resolve()), "weights_sha256": _hash_files(files)},
                            _processor_overrides(folder))
    _check_processor(folder, encoder)
    return encoder


def _check_heads(folder: Path, config) -> None:
    """The attention heads must divide the width: the stock module fails only when it first runs."""
    width = getattr(config, "embed_dim", None) or getattr(config, "hidden_size", None)
    heads = getattr(config, "num_heads", None) or getattr(config, "num_attention_heads", None)
    if isinstance(width, int) and isinstance(heads, int) and (heads < 1 or width % heads):
        raise CheckpointError(f"{folder}/config.json: {heads} attention heads do not divide the width {width}")


def _check_processor(folder: Path, encoder: LoadedEncoder) -> None:
    """preprocessor_config.json's patch geometry must be the tower's: another patch or merge size
    would cut images into rows the tower reads wrongly, silently."""
    tower = encoder.vision_config
    pairs = {"patch_size": getattr(tower, "patch_size", None), "temporal_patch_size": getattr(tower, "temporal_patch_size", None),
             "merge_size": getattr(tower, "spatial_merge_size", None),
             "pooling_kernel_size": getattr(tower, "pooling_kernel_size", None)}
    for key, expected in pairs.items():
        given = encoder.processor_overrides.get(key)
        if given is not None and expected is not None and given != expected:
            raise CheckpointError(f"{folder}/preprocessor_config.json: {key} {given!r} differs from the vision "
                                  f"tower's {expected}")


PROCESSOR_KEYS = ("image_mean", "image_std", "size", "patch_size", "temporal_patch_size", "merge_size",
                  "max_soft_tokens", "pooling_kernel_size")


def _processor_overrides(folder: Path) -> dict:
    """The image processor settings the checkpoint ships (min/max pixels become `size`)."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return {}
    saved = read_json_object(path, CheckpointError)
    overrides = {key: saved[key] for key in PROCESSOR_KEYS if key in saved}
    if "min_pixels" in saved and "max_pixels" in saved:
        overrides["size"] = {"shortest_edge": saved["min_pixels"], "longest_edge": saved["max_pixels"]}
    return overrides


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        if not any(folder.iterdir()):
            raise CheckpointError(f"model folder {folder} is empty")
        raise CheckpointError(f"model folder {folder} has no config.json")
    return read_json_object(path, CheckpointError)


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
            raise CheckpointError(f"{folder} has only pickle (.bin/.pt) weights; convert them to safetensors "
                                  "(pickle files are never loaded: they can run code)")
        raise CheckpointError(f"{folder} has no *.safetensors weight files")
    return files


def _read_vision_tensors(folder: Path, files: list[Path], alternatives: tuple[str | dict[str, str], ...],
                         names: set[str]) -> dict[str, torch.Tensor]:
    """Tensors of the naming alternative that covers most keys, renamed to the module's keys; only
    keys whose renamed first part is one of the module's top-level `names` are read."""
    keys: dict[Path, list[str]] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                keys[file] = list(f.keys())
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None

    def wanted(renames: dict[str, str]) -> dict[tuple[Path, str], str]:
        found = {}
        for file, names_in_file in keys.items():
            for key in names_in_file:
                renamed = _rename(key, renames)
                if renamed is not None and renamed.split(".")[0] in names:
                    found[file, key] = renamed
        return found

    options = [{a: ""} if isinstance(a, str) else a for a in alternatives]
    best = max((wanted(renames) for renames in options), key=len)
    if not best:
        prefixes = [p or "(no prefix)" for renames in options for p in renames]
        raise CheckpointError(f"{folder}: no vision tower tensors (keys starting with {' or '.join(prefixes)})")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for (source, key), renamed in best.items():
                if source == file:
                    state[renamed] = f.get_tensor(key)
    return state


def _rename(key: str, renames: dict[str, str]) -> str | None:
    for prefix, replacement in renames.items():
        if key.startswith(prefix):
            return replacement + key[len(prefix):]
    return None


def _hash_files(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
