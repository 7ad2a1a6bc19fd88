"""`--format ort-genai`: a model folder that ONNX Runtime GenAI 0.18 loads and generates from, with
the IPCV encoder as its vision model (the tiny chat built-ins: decoder head size 16). ORT GenAI
reads no DeepStack output, so Qwen3-VL's folder is compared with transformers with the taps left
out (`without_deepstack`)."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from ipcv_export import Method, Target, export
from ipcv_export.cli import EXIT_OK, EXIT_USAGE, main
from ipcv_export.folders.ort_genai import transformers_tokens
from ipcv_export.llm.chat_models import load_chat_model
from ipcv_export.llm.pipeline import EncoderFileTower
from ipcv_export.lower import ort_genai
from ipcv_export.runtime import load

CHAT = "tiny-qwen2.5-vl-chat"
QUESTION = "What is in the picture?"
TOKENS = 10


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two seeded noise photos of different sizes (16 x 22 and 10 x 14 patches after resizing)."""
    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for seed, (height, width) in enumerate(((224, 308), (140, 196))):
        pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
        paths.append(folder / f"photo{seed}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


SERVED_AS = {CHAT: "qwen2_5_vl", "tiny-qwen2-vl-chat": "qwen2_5_vl", "tiny-qwen3-vl-chat": "qwen3_vl",
             "tiny-qwen3.5-chat": "qwen3_5"}
"""Chat built-in -> the folder's ORT GenAI model type (Qwen2-VL is served as Qwen2.5-VL)."""


@pytest.fixture(scope="module", params=list(SERVED_AS))
def full_folder(request, tmp_path_factory):
    """(chat model, folder) at rho = 1, through the command line."""
    out = tmp_path_factory.mktemp("genai") / "rho1"
    assert main(["--model", request.param, "--retention", "1", "--format", "ort-genai", "-o", str(out), "-q"]) == EXIT_OK
    return request.param, out


@pytest.fixture(scope="module")
def ipcv_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("genai") / "qwen-rho0.5"
    export(CHAT, Target(out, format="ort-genai"), Method(retention=0.5), report=lambda _line: None)  # the API's folder target
    return out


def without_deepstack(chat):
    """The chat model with its stock tower's DeepStack features dropped, as ORT GenAI serves it
    (no-op for the families without taps)."""
    def drop_taps(_module, _args, output):
        output.deepstack_features = []
        return output
    chat.model.model.visual.register_forward_hook(drop_taps)
    return chat


def test_the_folder_holds_what_ort_genai_reads(full_folder):
    chat, full_folder = full_folder
    names = {p.name for p in full_folder.iterdir()}
    assert {"vision.onnx", "embedding.onnx", "model.onnx", "genai_config.json", "processor_config.json",
            "tokenizer.json", "ipcv-export.json"} <= names
    assert not [n for n in names if n.startswith((".ipcv-export", "vision.onnx."))]
    genai = json.loads((full_folder / "genai_config.json").read_text())["model"]
    assert genai["type"] == SERVED_AS[chat] and genai["vision"]["inputs"]["image_grid_thw"] == "image_grid_thw"
    assert genai["decoder"]["head_size"] % 8 == 0
    manifest = json.loads((full_folder / "ipcv-export.json").read_text())
    assert manifest["verification"]["verified"] and manifest["vision"]["runtime"] == "onnxruntime"
    assert [o.name for o in load(full_folder / "vision.onnx").session.get_outputs()] == ["image_features"]
    tokenizer = json.loads((full_folder / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer in ort_genai.RUNTIME_TOKENIZER_CLASSES  # the builder saves Qwen3.5's as Qwen3_5Tokenizer


@pytest.mark.parametrize("images", [1, 2], ids=["one-image", "two-sizes"])
def test_full_retention_generates_the_stock_models_tokens(full_folder, photos, images):
    """ORT GenAI's greedy ids equal transformers' generate with the stock model on the same image(s)
    and prompt (ORT GenAI's processor makes the pixels; the prompt ids are checked equal); for
    Qwen3-VL, the stock model with its DeepStack taps left out."""
    chat, folder = full_folder
    stock = without_deepstack(load_chat_model(chat))
    ran = ort_genai.generate(folder, photos[:images], stock.prompt_text(QUESTION, images), TOKENS)
    assert len(ran["image_grid_thw"]) == images and len(ran["tokens"]) == TOKENS
    assert ran["tokens"] == transformers_tokens(stock, QUESTION, ran, TOKENS)


def test_ipcv_folder_generates_from_its_own_vision_file(ipcv_folder, photos):
    """rho = 0.5: the tokens are those of transformers' language model fed the folder's own vision
    file, whose features differ from the stock tower's."""
    chat = load_chat_model(CHAT)
    stock_tower = chat.model.model.visual
    vision = load(ipcv_folder / "vision.onnx")
    ran = ort_genai.generate(ipcv_folder, photos, chat.prompt_text(QUESTION, 2), TOKENS)
    pixels, grid = torch.from_numpy(ran["pixel_values"]), torch.from_numpy(ran["image_grid_thw"])
    with torch.no_grad():
        stock_features = stock_tower(pixels, grid_thw=grid).pooler_output
    assert (vision(pixels, grid) - stock_features).abs().max().item() > 1e-2
    chat.model.model.visual = EncoderFileTower(vision, chat.model.config.get_text_config().hidden_size)
    assert ran["tokens"] == transformers_tokens(chat, QUESTION, ran, TOKENS)
    assert json.loads((ipcv_folder / "ipcv-export.json").read_text())["vision"]["ipcv"]["retention"] == 0.5


@pytest.mark.parametrize("case, message", [
    ("file", "is a file; --format ort-genai writes a folder"),
    ("foreign", "is a folder ipcv-export did not write"),
    ("head-12", "needs a decoder head size that is a multiple of 8; this model's is 12"),
    ("encoder-only", "unknown chat model 'tiny-qwen2.5-vl'"),
    ("no-tokenizer", "no usable tokenizer files"),
    ("no-genai", "needs onnxruntime-genai, which is not installed (pip install 'ipcv-export[serve]')"),
    ("runtime", "drop --runtime"),
])
def test_bad_folder_exports_are_one_line_exit_2(case, message, tmp_path, capsys, monkeypatch):
    out, model, extra = tmp_path / "folder", CHAT, []
    if case == "file":
        out.write_text("")
    elif case == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif case == "head-12":  # the tiny chat model's shape with 4 heads of 12, as it was before
        model, chat = str(tmp_path / "checkpoint"), load_chat_model(CHAT)
        text = chat.model.config.text_config
        text.num_attention_heads, text.num_key_value_heads = 4, 2
        text.rope_parameters["mrope_section"] = [2, 2, 2]
        AutoModelForImageTextToText.from_config(chat.model.config).save_pretrained(model)
        chat.tokenizer.save_pretrained(model)
    elif case == "encoder-only":
        model = "tiny-qwen2.5-vl"
    elif case == "no-tokenizer":
        model = str(tmp_path / "checkpoint")
        load_chat_model(CHAT).model.save_pretrained(model)
    elif case == "no-genai":
        monkeypatch.setitem(sys.modules, "onnxruntime_genai", None)
    else:
        extra = ["--runtime", "onnxruntime"]
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # what setting the case up printed
    assert main(["--model", model, "--format", "ort-genai", "-o", str(out), *extra]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
