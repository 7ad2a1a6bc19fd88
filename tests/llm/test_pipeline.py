"""End to end: encoder file + IVC-Prune + generate, checkpoint folders, and `ipcv-export generate`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ipcv_export.checkpoint import CheckpointError
from ipcv_export.cli import main
from ipcv_export.llm.chat_models import load_chat_model
from ipcv_export.llm.pipeline import Pipeline

PROMPT = "What is in the picture?"


def photo(seed: int = 0, size: tuple[int, int] = (140, 112)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module", params=["tiny-qwen2-vl-chat", "tiny-qwen2.5-vl-chat"])
def unpruned(request):
    return Pipeline(request.param, retention=1.0, llm_retention=1.0, report=lambda _: None)


def test_unpruned_pipeline_generates_the_stock_tokens(unpruned):
    images = [photo()]
    result = unpruned.generate(images, PROMPT, max_new_tokens=10)
    stock = load_chat_model(unpruned.chat.source["builtin"])
    pixel_values, grid = unpruned.preprocess(images)
    ids = stock.prompt_ids(PROMPT, grid)
    out = stock.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixel_values,
                               image_grid_thw=grid, mm_token_type_ids=(ids == stock.model.config.image_token_id).int(),
                               max_new_tokens=10, do_sample=False)
    assert result.new_token_ids == out[0, ids.shape[1]:].tolist()
    assert (result.patches, result.encoder_kept, result.visual_tokens, result.llm_visual_kept) == (80, 80, 20, 20)
    assert result.prompt_tokens_after == result.prompt_tokens == ids.shape[1]


def test_report_counts_every_stage(unpruned):
    pruning = Pipeline(unpruned.chat, encoder=unpruned.tower.encoder.path, llm_retention=0.35)
    result = pruning.generate([photo(1, (224, 168))], PROMPT, max_new_tokens=4)
    assert result.patches == 16 * 12 and result.visual_tokens == 48
    assert result.encoder_kept == 192  # this encoder file was exported at retention 1
    assert result.llm_visual_kept == 17 and result.prompt_tokens_after == result.prompt_tokens - 31
    assert result.kv_cache_bytes == 4 * 2 * 1 * 16 * 4 * (result.prompt_tokens_after + 3)  # layers, K+V, KV heads, d, fp32
    assert len(result.new_token_ids) == 4 and result.prefill_ms > 0 and result.decode_tokens_per_s > 0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen2-vl-chat")
    chat = load_chat_model("tiny-qwen2-vl-chat")
    chat.model.save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    return folder


def test_checkpoint_folder_loads_the_same_model(checkpoint):
    loaded, builtin = load_chat_model(str(checkpoint)), load_chat_model("tiny-qwen2-vl-chat")
    ids = builtin.prompt_ids(PROMPT, torch.zeros(0, 3, dtype=torch.int64))
    assert torch.equal(loaded.prompt_ids(PROMPT, torch.zeros(0, 3, dtype=torch.int64)), ids)
    assert torch.equal(loaded.model(input_ids=ids).logits, builtin.model(input_ids=ids).logits)
    assert loaded.encoder_source == str(checkpoint) and "weights_sha256" in loaded.source


def test_checkpoint_folder_problems_are_one_line_errors(checkpoint, tmp_path):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, no_tokenizer / name)
    with pytest.raises(CheckpointError, match="no usable tokenizer"):
        load_chat_model(str(no_tokenizer))
    (no_tokenizer / "model.safetensors").rename(no_tokenizer / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        load_chat_model(str(no_tokenizer))
    with pytest.raises(ValueError, match="unknown chat model"):
        load_chat_model("no-such-model")


def test_checkpoint_preprocessor_config_sets_the_image_size(checkpoint, tmp_path):
    folder = tmp_path / "small-images"
    shutil.copytree(checkpoint, folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 56 * 56, "max_pixels": 56 * 56}))
    result = Pipeline(str(folder), retention=1.0, llm_retention=1.0, report=lambda _: None).generate(
        [photo(4, (224, 224))], PROMPT, max_new_tokens=1)
    assert result.patches == 16 and result.visual_tokens == 4  # a square resized to 56 x 56 pixels: 4 x 4 patches (256 without the file)


def test_encoder_file_without_manifest_is_refused(unpruned, tmp_path):
    bare = tmp_path / "bare.onnx"
    shutil.copy(unpruned.tower.encoder.path, bare)
    with pytest.raises(ValueError, match="no manifest"):
        Pipeline(unpruned.chat, encoder=bare)


def test_encoder_file_of_another_model_is_refused(unpruned, tmp_path):
    other = tmp_path / "other.onnx"
    shutil.copy(unpruned.tower.encoder.path, other)
    manifest = dict(unpruned.tower.encoder.manifest, source={"builtin": "tiny-dinov2", "seed": 0})
    (tmp_path / "other.onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="was exported from tiny-dinov2, not from this model's vision tower"):
        Pipeline(unpruned.chat, encoder=other)


def test_cli_generate_from_a_checkpoint_folder(checkpoint, tmp_path, capsys, monkeypatch):
    """The encoder is exported once into the cache; the second run finds it there and answers the
    same; another retention or changed settings are another file."""
    monkeypatch.setenv("IPCV_EXPORT_CACHE", str(tmp_path / "cache"))
    image = tmp_path / "photo.png"
    photo(3).save(image)
    args = ["generate", "--model", str(checkpoint), "--image", str(image), "--prompt", PROMPT,
            "--retention", "0.5", "--llm-retention", "0.5", "--max-new-tokens", "3"]
    code = main(args)
    out = capsys.readouterr().out
    assert code == 0
    assert "80 patches -> encoder blocks on 40 -> 20 to the LLM -> 10 from its pruning layer on" in out
    assert "generated: " in out and "tokens/s" in out and "KV cache" in out
    assert "the encoder file is cached for later runs" in out
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "cached by an earlier run" in again and "verify" not in again
    assert again.split("generated: ")[1].splitlines()[0] == out.split("generated: ")[1].splitlines()[0]
    assert len(list((tmp_path / "cache" / "encoders").iterdir())) == 1


def test_encoder_cache_key_follows_weights_settings_and_retention(checkpoint, tmp_path):
    from ipcv_export.cache import encoder_cache_file

    chat = load_chat_model(str(checkpoint))
    first = encoder_cache_file(chat.source, str(checkpoint), 5000)
    assert encoder_cache_file(chat.source, str(checkpoint), 5000) == first
    assert encoder_cache_file(chat.source, str(checkpoint), 3500) != first
    assert encoder_cache_file(dict(chat.source, weights_sha256="0" * 64), str(checkpoint), 5000) != first
    changed = tmp_path / "changed"
    shutil.copytree(checkpoint, changed)
    (changed / "preprocessor_config.json").write_text(json.dumps({"max_pixels": 56 * 56}))
    assert encoder_cache_file(chat.source, str(changed), 5000) != first


def test_cli_generate_refuses_a_manifest_as_the_encoder(capsys, tmp_path):
    (tmp_path / "e.onnx.json").write_text("{}")
    code = main(["generate", "--model", "tiny-qwen2.5-vl-chat", "--prompt", "hi", "--encoder", str(tmp_path / "e.onnx.json")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load e.onnx.json: supported formats are .onnx, .pt2, .engine" in err and err.count("\n") == 1


@pytest.mark.parametrize("args,message", [
    (["--image", "missing.png"], "does not exist"),
    (["--llm-retention", "1.5"], "LLM retention must be in (0, 1]"),
    (["--encoder", "missing.onnx"], "encoder file 'missing.onnx' does not exist"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--llm-layer", "9"], "LLM pruning layer must be in [1, 3]"),
    (["--encoder", "e.onnx", "--retention", "0.3"], "--retention sets the encoder export; --encoder gives a file"),
    (["--prompt", "<|image_pad|>"], "the prompt holds the special token '<|image_pad|>'"),
    (["--prompt", "<|vision_start|><|image_pad|><|vision_end|> what is it?"], "special token '<|vision_start|>'"),
])
def test_cli_generate_usage_errors(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["generate", "--model", "tiny-qwen2.5-vl-chat", "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
