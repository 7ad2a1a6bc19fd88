"""The pieces of an ONNX Runtime GenAI model folder around an exported vision file.

ONNX Runtime GenAI (0.18) serves a vision-language model from one folder: `vision.onnx`
(pixel_values, image_grid_thw -> image_features), `embedding.onnx` (input_ids, image_features ->
inputs_embeds), a decoder that reads inputs_embeds, `genai_config.json`, `processor_config.json`
(onnxruntime-extensions' image processor) and the tokenizer files. Its own builder writes only the
decoder, its config and the tokenizer; the rest is written here. Facts from the 0.18 wheel and its
sources: its config parser refuses unknown keys, the grid input's default name is `image_sizes`
(so the vision section names `image_grid_thw`), the decoder's attention needs a head size that is
a multiple of 8, and each step runs the embedding model, with zero image rows after the prompt.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from ..config import UsageError

GENAI_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_5_vl", "qwen3_vl": "qwen3_vl", "qwen3_5": "qwen3_5"}
"""transformers model_type -> ONNX Runtime GenAI model type, for the families served here. ORT
GenAI has no qwen2_vl type; Qwen2-VL's language model is Qwen2.5-VL's (same layers and weight
names, M-RoPE with the same image positions), so it is served under qwen2_5_vl (`as_qwen2_5_vl`),
which the folder's verification checks token for token. The 0.18 builder labels a Qwen3-VL
decoder "qwen3vl", a type its own runtime does not know; complete_genai_config writes the type."""
RUNTIME_TOKENIZER_CLASSES = ("GPT2Tokenizer", "Qwen2Tokenizer", "TokenizersBackend")
"""The tokenizer classes ORT GenAI 0.18 accepts (its library's table); TokenizersBackend reads the
folder's tokenizer.json as written. transformers saves Qwen3.5's as Qwen3_5Tokenizer, a class the
runtime refuses although it is a plain tokenizer.json model."""
INSTALL_HINT = "pip install 'ipcv-export[serve]'"
DECODER_FILE = "model.onnx"


def require_genai():
    """The onnxruntime_genai module, or UsageError saying how to install it."""
    try:
        import onnxruntime_genai
    except ImportError:
        raise UsageError(f"--format ort-genai needs onnxruntime-genai, which is not installed ({INSTALL_HINT})") from None
    return onnxruntime_genai


def genai_model_type(config) -> str:
    """The ORT GenAI model type for a transformers config, or UsageError."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GENAI_MODEL_TYPES:
        raise UsageError(f"ONNX Runtime GenAI has no model type for {model_type!r} here; --format ort-genai "
                         f"serves {', '.join(GENAI_MODEL_TYPES)}")
    text = config.get_text_config()
    head = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    if head % 8:
        raise UsageError(f"ONNX Runtime GenAI's attention needs a decoder head size that is a multiple of 8; "
                         f"this model's is {head}")
    return GENAI_MODEL_TYPES[model_type]


def as_qwen2_5_vl(model: torch.nn.Module) -> torch.nn.Module:
    """A Qwen2-VL model's language model and head under Qwen2.5-VL's classes, for ORT GenAI's
    builder (which knows Qwen2.5-VL's architecture only and reads only the language model): the
    same tensors, not copies, and a one-block stand-in vision tower."""
    from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig

    source = model.config
    text = {**source.get_text_config().to_dict(), "model_type": "qwen2_5_vl_text"}
    config = Qwen2_5_VLConfig(text_config=text, vision_config={"depth": 1, "hidden_size": 16, "num_heads": 1,
                                                               "intermediate_size": 16, "out_hidden_size": text["hidden_size"]},
                              image_token_id=source.image_token_id, video_token_id=source.video_token_id,
                              vision_start_token_id=source.vision_start_token_id,
                              vision_end_token_id=source.vision_end_token_id)
    with torch.device("meta"):
        relabelled = AutoModelForImageTextToText.from_config(config)
    language = {name: tensor for name, tensor in model.state_dict().items() if not name.startswith("model.visual.")}
    missing, unexpected = relabelled.load_state_dict(language, strict=False, assign=True)
    if unexpected or any(not name.startswith("model.visual.") for name in missing):
        raise UsageError(f"this model's language model does not match Qwen2.5-VL's ({(unexpected or missing)[0]})")
    relabelled.model.visual.to_empty(device="cpu")
    for parameter in relabelled.model.visual.parameters():
        torch.nn.init.zeros_(parameter)
    return relabelled


def build_decoder(checkpoint: Path, folder: Path, cache: Path, log: Path) -> None:
    """Run ORT GenAI's builder on a transformers checkpoint folder (offline): the decoder reading
    inputs_embeds (exclude_embeds), its genai_config.json and the tokenizer files, into `folder`."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(folder),
               "-p", "fp32", "-e", "cpu", "-c", str(cache), "--extra_options", "exclude_embeds=true",
               "exclude_mtp=true", "hf_token=false", f"filename={DECODER_FILE}"]  # MTP: Qwen3.5's draft head
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log.open("w") as output:
        finished = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env)
    if finished.returncode:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise UsageError(f"ONNX Runtime GenAI's builder failed on the language model: "
                         f"{lines[-1] if lines else 'no output'}")
    _relabel_tokenizer(folder / "tokenizer_config.json")


def _relabel_tokenizer(path: Path) -> None:
    """Name the saved tokenizer's class one the runtime accepts: TokenizersBackend, which reads
    tokenizer.json as it is, for a class outside RUNTIME_TOKENIZER_CLASSES. The folder's
    verification checks that the runtime's prompt ids are the model tokenizer's."""
    settings = json.loads(path.read_text())
    if settings.get("tokenizer_class") not in RUNTIME_TOKENIZER_CLASSES:
        path.write_text(json.dumps({**settings, "tokenizer_class": "TokenizersBackend"}, indent=2) + "\n")


class _EmbeddingWithImages(torch.nn.Module):
    """input_ids [B, S], image_features [I, hidden] -> inputs_embeds [B, S, hidden]: the token
    embeddings, with the image-pad positions taking the image features in order (what the stock
    model's masked_scatter does). Decode steps pass I = 0; a surplus of pad tokens reads zeros."""

    def __init__(self, weight: torch.Tensor, image_token_id: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.image_token_id = image_token_id

    def forward(self, input_ids: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        embeds = torch.nn.functional.embedding(input_ids, self.weight)
        is_image = (input_ids == self.image_token_id).flatten()
        rows = image_features.shape[0]
        order = torch.cumsum(is_image.to(torch.int64), 0) - 1
        index = torch.where(is_image, torch.clamp(order, max=rows), torch.full_like(order, rows))
        padded = torch.cat([image_features, image_features.new_zeros(1, image_features.shape[1])])
        picked = padded.index_select(0, index).view(embeds.shape)
        return torch.where(is_image.view(*input_ids.shape, 1), picked, embeds)


def write_embedding(embedding: torch.Tensor, image_token_id: int, path: Path) -> None:
    """embedding.onnx from the language model's token embedding table; B, S and I dynamic."""
    module = _EmbeddingWithImages(embedding, image_token_id)
    example = (torch.full((2, 5), image_token_id), torch.zeros(6, embedding.shape[1]))
    example[0][0, 1] = example[0][1, 3] = 0  # not every position an image token
    shapes = ({0: torch.export.Dim("batch", min=1, max=256), 1: torch.export.Dim("sequence", min=1, max=1 << 20)},
              {0: torch.export.Dim("image_rows", min=0, max=1 << 20)})
    program = torch.export.export(module, example, dynamic_shapes=shapes)
    onnx_program = torch.onnx.export(program, input_names=["input_ids", "image_features"],
                                     output_names=["inputs_embeds"], dynamo=True, verbose=False)
    onnx_program.save(str(path))


def complete_genai_config(path: Path, config, vision_file: str, embedding_file: str) -> None:
    """Add the vision and embedding sections and the image token ids to the builder's config, set
    the runtime's model type, and make greedy search the default (the folder is verified greedily)."""
    genai = json.loads(path.read_text())
    model = genai["model"]
    model["type"] = genai_model_type(config)
    vision = config.vision_config
    sessions = {"log_id": "onnxruntime-genai", "provider_options": []}
    model.update(image_token_id=config.image_token_id, video_token_id=config.video_token_id,
                 vision_start_token_id=config.vision_start_token_id)
    model["embedding"] = {"filename": embedding_file, "session_options": sessions,
                          "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                          "outputs": {"inputs_embeds": "inputs_embeds"}}
    model["vision"] = {"filename": vision_file, "config_filename": "processor_config.json", "session_options": sessions,
                       "spatial_merge_size": vision.spatial_merge_size, "patch_size": vision.patch_size,
                       "window_size": getattr(vision, "window_size", 0),
                       "tokens_per_second": float(getattr(vision, "tokens_per_second", 2.0)),
                       "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
                       "outputs": {"image_features": "image_features"}}
    genai["search"].update(do_sample=False, top_k=1)
    path.write_text(json.dumps(genai, indent=2) + "\n")


def write_processor_config(path: Path, preprocessing: dict) -> None:
    """processor_config.json for onnxruntime-extensions' Qwen2.5-VL image processor, from the
    settings of the model's own processor (the manifest's `preprocessing`)."""
    settings = preprocessing["kwargs"]
    size = settings.get("size", {})
    patch, merge = int(settings["patch_size"]), int(settings["merge_size"])
    transforms = [
        ("decode_image", "DecodeImage", {"color_space": "RGB"}),
        ("convert_to_rgb", "ConvertRGB", None),
        ("resize", "Resize", {"width": 540, "height": 360, "smart_resize": 1,  # sizes unused with smart_resize
                              "min_pixels": int(size.get("shortest_edge", 56 * 56)),
                              "max_pixels": int(size.get("longest_edge", 28 * 28 * 1280)),
                              "patch_size": patch, "merge_size": merge}),
        ("rescale", "Rescale", {"rescale_factor": float(settings.get("rescale_factor", 1 / 255))}),
        ("normalize", "Normalize", {"mean": [float(v) for v in settings["image_mean"]],
                                    "std": [float(v) for v in settings["image_std"]], "qwen2_5_vl": 1}),
        ("patch_image", "PatchImage", {"patch_size": patch, "temporal_patch_size": int(settings["temporal_patch_size"]),
                                       "merge_size": merge}),
    ]
    operations = [{"operation": {"name": name, "type": kind, **({"attrs": attrs} if attrs else {})}}
                  for name, kind, attrs in transforms]
    path.write_text(json.dumps({"processor": {"name": "qwen2_5_image_processor", "transforms": operations}}, indent=2)
                    + "\n")


def generate(folder: Path, images: list[Path], prompt: str, max_new_tokens: int) -> dict:
    """Greedy generation in ORT GenAI from the folder: the new token ids, and the pixel_values,
    image_grid_thw and input_ids its processor made (so that a reference can be run on the same).
    Its processor pads every image's patch rows to the largest image's count (it slices them off
    again before each per-image vision call); the pixel_values returned are the real rows, packed
    as transformers' processor packs them."""
    og = require_genai()
    model = og.Model(str(folder))
    processor = model.create_multimodal_processor()
    inputs = processor(prompt, images=og.Images.open(*(str(image) for image in images)))
    arrays = {name: inputs[name].as_numpy() for name in ("pixel_values", "image_grid_thw", "input_ids")}
    rows, stride = arrays["image_grid_thw"].prod(1), len(arrays["pixel_values"]) // len(arrays["image_grid_thw"])
    arrays["pixel_values"] = np.concatenate([arrays["pixel_values"][i * stride:i * stride + n] for i, n in enumerate(rows)])
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=int(arrays["input_ids"].shape[-1]) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.set_inputs(inputs)
    tokens = []
    while not generator.is_done() and len(tokens) < max_new_tokens:
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return {"tokens": tokens, **arrays}
