"""Full Qwen2-VL / Qwen2.5-VL / Qwen3-VL / Qwen3.5 models (vision + LLM + tokenizer) for the generation
pipeline and the ORT GenAI folder (Qwen3.5: the folder only, `IvcPrune` refuses its hybrid LLM).

Built-ins live in `models/chat/<name>/` as config.json and builtin.json (description, seed, and the
built-in encoder whose weights the vision tower takes, so that an encoder file exported from that
name fits the model); all of them read the byte tokenizer in `models/chat/byte-tokenizer/`. Checkpoint
folders load the same way, with their safetensors weights; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer, PreTrainedModel

from ..checkpoint import CheckpointError, _hash_files, _read_config, _weight_files
from ..config import UsageError, first_line
from ..loading import load_encoder, missing_folder

CHAT_DIR = Path(__file__).resolve().parent.parent / "models" / "chat"
BYTE_TOKENIZER_DIR = CHAT_DIR / "byte-tokenizer"
"""The one tokenizer every built-in chat model reads (tools/make_tiny_chat_tokenizer.py wrote it)."""
CHAT_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
"""One of these must exist: transformers would otherwise build an empty tokenizer without a word."""
SYSTEM_PROMPTS = {"qwen2_vl": "You are a helpful assistant.", "qwen2_5_vl": "You are a helpful assistant."}
"""The system turn each family's chat template adds when the conversation has none (Qwen3-VL's adds none)."""


@dataclass
class ChatModel:
    """A generation-ready model: the stock transformers module in eval mode and its tokenizer."""

    model: PreTrainedModel
    tokenizer: object
    encoder_source: str  # what `ipcv_export.export` takes to build this model's encoder file
    source: dict = field(default_factory=dict)

    @property
    def merge_size(self) -> int:
        return self.model.config.vision_config.spatial_merge_size

    def check_question(self, question: str) -> None:
        """Refuse a question holding one of the tokenizer's special tokens: the template places the
        images and the turns, and a stray `<|image_pad|>` would have no image features to stand for."""
        special = [token.content for token in self.tokenizer.added_tokens_decoder.values() if token.content in question]
        if special:
            raise UsageError(f"the prompt holds the special token {special[0]!r}; give only the question "
                             "(images are placed by --image / the images argument)")

    def prompt_text(self, question: str, images: int) -> str:
        """Qwen's chat template for `images` images + question, one pad token per image (a runtime's
        processor, like ONNX Runtime GenAI's, repeats it once per merged token), ending in the
        assistant prefix."""
        self.check_question(question)
        pads = "".join("<|vision_start|><|image_pad|><|vision_end|>" for _ in range(images))
        system = SYSTEM_PROMPTS.get(self.model.config.model_type)
        return ((f"<|im_start|>system\n{system}<|im_end|>\n" if system else "")
                + f"<|im_start|>user\n{pads}{question}<|im_end|>\n<|im_start|>assistant\n")

    def prompt_ids(self, question: str, grids: torch.Tensor) -> torch.Tensor:
        """[1, S] ids of Qwen's chat template for images + question, with each image's pad token
        repeated once per merged token (as the stock processor does), ending in the assistant prefix."""
        ids = self.tokenizer(self.prompt_text(question, len(grids)), add_special_tokens=False,
                             return_tensors="pt")["input_ids"][0]
        pad = self.model.config.image_token_id
        counts = iter((grids.prod(-1) // self.merge_size ** 2).tolist())
        pieces = [torch.full((next(counts),), pad) if int(token) == pad else token.reshape(1) for token in ids]
        return torch.cat(pieces)[None]


def builtin_chat_models() -> dict[str, str]:
    return {p.name: json.loads((p / "builtin.json").read_text())["description"]
            for p in sorted(CHAT_DIR.iterdir()) if (p / "builtin.json").is_file()}


def load_chat_model(model: str) -> ChatModel:
    """A built-in chat model name or a local checkpoint folder -> ChatModel."""
    if model in builtin_chat_models():
        return _build_builtin(model)
    path = Path(model)
    if path.is_dir():
        return _load_folder(path)
    if "/" in model:
        raise UsageError(missing_folder(model))
    raise UsageError(f"unknown chat model {model!r}; use a checkpoint folder or a built-in: "
                     f"{', '.join(builtin_chat_models())}")


def _build_builtin(name: str) -> ChatModel:
    folder = CHAT_DIR / name
    spec = json.loads((folder / "builtin.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        model = AutoModelForImageTextToText.from_config(config)
        _spread_language_weights(model)
    model.model.visual.load_state_dict(load_encoder(spec["encoder"]).module.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(BYTE_TOKENIZER_DIR)
    return ChatModel(model.eval(), tokenizer, spec["encoder"], {"builtin": name, "seed": spec["seed"], "random_weights": True})


def _spread_language_weights(model: PreTrainedModel) -> None:
    """Redraw the random language weights with a larger spread. With the default 0.02 the tiny
    model's next-token logits nearly tie, so float noise of 1e-6 (an exported encoder vs. eager)
    could flip greedy choices; spread weights keep generated tokens a meaningful comparison."""
    for name, parameter in model.named_parameters():
        if parameter.ndim == 2 and not name.startswith("model.visual"):
            torch.nn.init.normal_(parameter, std=0.3)


def _load_folder(folder: Path) -> ChatModel:
    config = _read_config(folder)
    if config.get("model_type") not in CHAT_MODEL_TYPES:
        raise CheckpointError(f"{folder}: chat models are {', '.join(CHAT_MODEL_TYPES)} models, "
                              f"not {config.get('model_type')!r}")
    files = _weight_files(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(f"{folder}: no usable tokenizer files (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder}: no usable tokenizer files ({first_line(err)})") from None
    model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                        dtype=torch.float32)
    return ChatModel(model.eval(), tokenizer, str(folder), {"path": str(folder.resolve()), "weights_sha256": _hash_files(files)})
