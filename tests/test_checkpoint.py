"""Checkpoint folders: safetensors only, vision tensors only, both key layouts; clear refusals."""

import json

import pytest
import torch
from safetensors.torch import save_file

from ipcv_export.checkpoint import CheckpointError
from ipcv_export.config import UsageError
from ipcv_export.loading import load_encoder

TINY_VISION = json.loads(
    (__import__("ipcv_export.models", fromlist=["CONFIG_DIR"]).CONFIG_DIR / "tiny-qwen2-vl.json").read_text()
)["vision_config"]


def _write_checkpoint(folder, visual, prefix, shards=2, model_type="qwen2_vl", vision_config=None):
    """A full-model-like folder: config.json, sharded safetensors with an index, and LLM weights."""
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "vision_config": vision_config or TINY_VISION}))
    state = {prefix + k: v.contiguous() for k, v in visual.state_dict().items() if "inv_freq" not in k}
    state["model.language_model.embed_tokens.weight"] = torch.zeros(10, 4)
    keys = sorted(state)
    weight_map = {}
    for shard in range(shards):
        name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[shard::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("prefix", ["visual.", "model.visual."])
def test_checkpoint_round_trip(prefix, tiny, tmp_path):
    folder = _write_checkpoint(tmp_path / "ckpt", tiny.module, prefix)
    loaded = load_encoder(str(folder))
    for key, value in tiny.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert loaded.source["path"] == str(folder.resolve()) and len(loaded.source["weights_sha256"]) == 64


@pytest.mark.parametrize("builtin,model_type", [("tiny-qwen3.5", "qwen3_5"), ("tiny-qwen3-vl", "qwen3_vl")])
def test_newer_families_round_trip(builtin, model_type, tmp_path):
    """The vision tower and its mergers (DeepStack's included) come back from a full-model folder."""
    from ipcv_export.models import CONFIG_DIR

    encoder = load_encoder(builtin)
    vision = json.loads((CONFIG_DIR / f"{builtin}.json").read_text())["vision_config"]
    folder = _write_checkpoint(tmp_path / "ckpt", encoder.module, "model.visual.", model_type=model_type,
                               vision_config=vision)
    loaded = load_encoder(str(folder))
    assert loaded.description is encoder.description
    for key, value in encoder.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def test_bin_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": TINY_VISION}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(CheckpointError, match="pickle"):
        load_encoder(str(tmp_path))


@pytest.mark.parametrize("case, message", [
    ("empty", "empty"), ("no_config", "no config.json"), ("unsupported", "unsupported architecture"),
    ("corrupt", "not a readable safetensors"), ("no_vision", "no vision tower tensors"),
    ("config_list", "must hold a JSON object, not a list"), ("config_string", "must hold a JSON object, not a str"),
    ("wrong_type", "does not describe a qwen2_vl vision tower"), ("heads", "5 attention heads do not divide the width"),
    ("other_shape", r"vision weights do not match the config \(size mismatch"), ("int_weight", "is torch.int64, not floating"),
    ("processor_patch", "preprocessor_config.json: patch_size 16 differs from the vision tower's 14"),
    ("processor_merge", "preprocessor_config.json: merge_size 3 differs from the vision tower's 2"),
])
def test_bad_folders_are_refused_with_one_line(case, message, tiny, tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    if case == "no_config":
        (folder / "weights.safetensors").write_bytes(b"")
    elif case == "unsupported":
        (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    elif case == "corrupt":
        _write_checkpoint(folder, tiny.module, "visual.", shards=1)
        shard = next(folder.glob("*.safetensors"))
        shard.write_bytes(shard.read_bytes()[:200])
    elif case in ("config_list", "config_string"):
        (folder / "config.json").write_text(json.dumps([1, 2] if case == "config_list" else "qwen2_vl"))
    elif case in ("wrong_type", "heads", "other_shape"):
        _write_checkpoint(folder, tiny.module, "visual.", shards=1)
        changed = {"wrong_type": {"depth": "six"}, "heads": {"num_heads": 5},
                   "other_shape": {"embed_dim": TINY_VISION["embed_dim"] * 2}}[case]
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": TINY_VISION | changed}))
    elif case == "int_weight":
        _write_checkpoint(folder, tiny.module, "visual.", shards=1)
        shard = next(folder.glob("*.safetensors"))
        save_file({"visual.patch_embed.proj.weight": torch.zeros(2, dtype=torch.int64)}, str(shard))
    elif case.startswith("processor_"):
        _write_checkpoint(folder, tiny.module, "visual.", shards=1)
        bad = {"patch_size": 16} if case == "processor_patch" else {"merge_size": 3}
        (folder / "preprocessor_config.json").write_text(json.dumps(bad))
    elif case == "no_vision":
        (folder / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "vision_config": TINY_VISION}))
        save_file({"lm_head.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message) as err:
        load_encoder(str(folder))
    assert "\n" not in str(err.value)


def test_unknown_names_and_missing_folders_are_refused(tmp_path):
    with pytest.raises(UsageError, match="unknown model 'qwen9'.*tiny-qwen2-vl"):
        load_encoder("qwen9")
    with pytest.raises(UsageError, match="does not exist"):
        load_encoder(str(tmp_path / "missing"))
