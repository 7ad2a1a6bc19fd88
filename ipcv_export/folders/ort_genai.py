"""`ipcv-export --format ort-genai -o DIR`: a model folder that ONNX Runtime GenAI generates from,
with the IPCV encoder as its vision model.

The vision file is exported and verified as every `.onnx` file (for ONNX Runtime: attention loops
over an image's or a video's segments); the other pieces come from `lower/ort_genai.py` and ORT
GenAI's own builder. The folder is its own parity gate: ORT GenAI generates greedily from a test
image and prompt, the vision file's features on the pixels ORT GenAI's processor made are checked
against the eager reference, and the tokens must equal transformers' generation from the same
encoder file and pixels. Everything is staged beside DIR and renamed into place only then; the
result is recorded in DIR/ipcv-export.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import __version__, outputs, runtime
from ..config import IpcvConfig, Method, Target, UsageError
from ..contract import OUTPUT_NAMES
from ..llm.chat_models import ChatModel, load_chat_model
from ..llm.pipeline import EncoderFileTower
from ..loading import load_encoder
from ..lower import ort_genai
from ..lower.onnx import keep_outputs
from ..models.encoder import LoadedEncoder
from ..pipeline import ExportResult, export_file
from ..verify import ParityError, check_parity

MANIFEST = "ipcv-export.json"
VISION_FILE, EMBEDDING_FILE = "vision.onnx", "embedding.onnx"
CHECK_QUESTION = "Describe the image."
CHECK_TOKENS = 8


def write_folder(model: str, target: Target, method: Method, report: Callable[[str], None] = print) -> ExportResult:
    """Write the ORT GenAI folder `target.output` of a chat model (built-in name or checkpoint
    folder with its tokenizer) with the vision tower exported with `method` (the writer of
    `--format ort-genai`, see folders/__init__.py). UsageError for bad input, ParityError when the folder does not
    generate what transformers does."""
    output = target.output
    _check_folder_target(target, method)
    ort_genai.require_genai()
    _check_folder_output(output)
    with outputs.locked(output):
        chat = load_chat_model(model)
        model_type = ort_genai.genai_model_type(chat.model.config)
        encoder = load_encoder(chat.encoder_source)  # exported, then the folder's reference
        with outputs.staging(output.parent) as staging:
            folder, work = staging / output.name, staging / "work"
            folder.mkdir()
            work.mkdir()
            vision_target = Target(folder / VISION_FILE, runtime="onnxruntime", diagnostic_outputs=True)
            vision = export_file(encoder, vision_target, method, report=_staged_report(report))
            report("build: the decoder with ONNX Runtime GenAI's builder ...")
            ort_genai.build_decoder(_checkpoint_folder(chat, work), folder, work / "cache", work / "builder.log")
            config = chat.model.config
            ort_genai.write_embedding(chat.model.get_input_embeddings().weight, config.image_token_id,
                                      folder / EMBEDDING_FILE)
            ort_genai.complete_genai_config(folder / "genai_config.json", config, VISION_FILE, EMBEDDING_FILE)
            ort_genai.write_processor_config(folder / "processor_config.json", vision.manifest["preprocessing"])
            checked = verify_folder(folder, chat, encoder, vision.manifest, work)
            report(f"verify (ONNX Runtime GenAI): {len(checked['tokens'])} generated tokens equal transformers'; "
                   f"vision features within {checked['vision']['limit']:.0e} of the reference")
            keep_outputs(folder / VISION_FILE, OUTPUT_NAMES[:1])
            vision.manifest["outputs"] = vision.manifest["outputs"][:1]
            Path(f"{folder / VISION_FILE}.json").unlink()
            manifest = {"tool": {"name": "ipcv-export", "version": __version__}, "format": "ort-genai",
                        "model_type": model_type, "source": chat.source,
                        "vision": vision.manifest, "verification": checked}
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            _replace_folder(folder, output, staging)
    report(f"wrote {output}/ (ONNX Runtime GenAI model folder)")
    return ExportResult(output, manifest)


def _staged_report(report: Callable[[str], None]) -> Callable[[str], None]:
    """The vision export's lines, less the one naming its staged path (the folder's own line follows)."""
    return lambda line: None if line.startswith("wrote ") else report(f"vision {line.strip()}")


def _check_folder_target(target: Target, method: Method) -> None:
    """UsageError for a target setting the folder does not take (it is always verified, its vision
    file is fp32 ONNX for ONNX Runtime), and for --budget: the method is given by its settings."""
    defaults = Target(target.output, target.format)
    refused = [flag for flag, given in (("--budget", method.budget is not None),
                                        ("--runtime", target.runtime != defaults.runtime),
                                        ("--precision", target.precision != defaults.precision),
                                        ("--skip-verify", not target.verify)) if given]
    if refused:
        raise UsageError(f"--format ort-genai writes a verified ONNX Runtime folder; drop {', '.join(refused)}")


def _check_folder_output(output: Path) -> None:
    """UsageError unless DIR can be written: its parent exists, and DIR is absent, empty, or a
    folder an earlier ort-genai export wrote (then it is replaced on success)."""
    if not output.parent.is_dir():
        raise UsageError(f"output folder {output.parent} does not exist")
    if output.exists() and not output.is_dir():
        raise UsageError(f"{output} is a file; --format ort-genai writes a folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise UsageError(f"{output} is a folder ipcv-export did not write; give a new or empty folder")
    outputs.check_writable(output.parent)


def _checkpoint_folder(chat: ChatModel, work: Path) -> Path:
    """A transformers folder of the whole model for the builder: a checkpoint of a type the
    builder knows, itself; else the model saved with its tokenizer (a Qwen2-VL model as
    Qwen2.5-VL, `as_qwen2_5_vl`)."""
    native = chat.model.config.model_type != "qwen2_vl"
    if native and "path" in chat.source:
        return Path(chat.source["path"])
    folder = work / "checkpoint"
    (chat.model if native else ort_genai.as_qwen2_5_vl(chat.model)).save_pretrained(folder)
    chat.tokenizer.save_pretrained(folder)
    return folder


def verify_folder(folder: Path, chat: ChatModel, encoder: LoadedEncoder, vision_manifest: dict, work: Path) -> dict:
    """Generate from the folder in ORT GenAI, check the vision file on the pixels it fed, and
    compare the tokens with transformers' greedy generation from the same encoder file and pixels."""
    image = work / "check.png"
    _check_image().save(image)
    ran = ort_genai.generate(folder, [image], chat.prompt_text(CHECK_QUESTION, 1), CHECK_TOKENS)
    pixels, grid = _processed(ran)
    vision_file = runtime.load(folder / VISION_FILE)
    config = IpcvConfig(**{field.name: vision_manifest["ipcv"][field.name] for field in dataclasses.fields(IpcvConfig)})
    vision = check_parity(vision_file.run_all, encoder.module, config, grid, pixels, description=encoder.description)
    chat.model.model.visual = EncoderFileTower(vision_file, chat.model.config.get_text_config().hidden_size,
                                               deepstack=False)  # ORT GenAI reads no DeepStack output
    expected = transformers_tokens(chat, CHECK_QUESTION, ran, CHECK_TOKENS)
    if ran["tokens"] != expected[:len(ran["tokens"])] or not ran["tokens"]:
        raise ParityError(f"ONNX Runtime GenAI generated {ran['tokens']}, transformers with the same encoder file "
                          f"{expected}")
    return {"verified": True, "question": CHECK_QUESTION, "image_grid_thw": grid.tolist(), "tokens": ran["tokens"],
            "vision": vars(vision)}


def transformers_tokens(chat: ChatModel, question: str, ran: dict, count: int) -> list[int]:
    """transformers' greedy tokens for the question and the pixels and grid that ORT GenAI's
    processor made (`ran`, from ort_genai.generate), after checking that its prompt ids are the
    model tokenizer's."""
    pixels, grid = _processed(ran)
    ids = chat.prompt_ids(question, grid)
    if not np.array_equal(ran["input_ids"].reshape(-1), ids.reshape(-1).numpy()):
        raise ParityError("ONNX Runtime GenAI's processor made other prompt ids than the model's tokenizer")
    image_tokens = (ids == chat.model.config.image_token_id).int()
    with torch.inference_mode():
        out = chat.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                  image_grid_thw=grid, mm_token_type_ids=image_tokens, max_new_tokens=count,
                                  do_sample=False)
    return out[0, ids.shape[1]:].tolist()


def _processed(ran: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel_values, image_grid_thw) that ORT GenAI's processor made, as torch tensors."""
    return torch.from_numpy(ran["pixel_values"]).float(), torch.from_numpy(ran["image_grid_thw"]).long()


def _check_image() -> Image.Image:
    """A 308 x 224 test photo: smooth colour ramps with seeded noise (not a flat image, whose
    patches would all tie)."""
    rows, cols = np.mgrid[0:224, 0:308]
    ramp = np.stack([rows * 255 / 223, cols * 255 / 307, (rows + cols) * 255 / 530], -1)
    noise = np.random.default_rng(0).normal(0, 20, ramp.shape)
    return Image.fromarray(np.clip(ramp + noise, 0, 255).astype(np.uint8))


def _replace_folder(staged: Path, output: Path, staging: Path) -> None:
    """Move the verified folder onto `output`; an earlier folder there goes only after that."""
    previous = staging / "previous"
    if output.exists():
        os.replace(output, previous)
    os.replace(staged, output)
    shutil.rmtree(previous, ignore_errors=True)
