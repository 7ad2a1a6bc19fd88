"""The Python runtime: images in through the model's own processor, embeddings out."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessorPil

from conftest import PARITY_GRIDS, assert_openvino_agrees, grid_inputs
from ipcv_export import UsageError, export, load
from ipcv_export.reference import stock_reference


@pytest.fixture(scope="module")
def encoder_file(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("runtime") / "encoder.onnx"
    export(tiny, out, report=lambda _line: None)
    return out


def _photo(height: int, width: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_encode_images_runs_the_processor_then_the_file(encoder_file, tiny):
    encoder = load(encoder_file)
    images = [_photo(300, 400, 0), _photo(200, 120, 1)]
    embeddings = encoder.encode_images(images, max_pixels=224 * 224)

    processor = Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2,
                                         size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224})
    batch = processor(images=images, return_tensors="pt")
    expected = encoder(batch["pixel_values"], batch["image_grid_thw"])
    sizes = (batch["image_grid_thw"].prod(-1) // 4).tolist()
    assert [len(e) for e in embeddings] == sizes and sum(sizes) == len(expected)
    torch.testing.assert_close(torch.cat(embeddings), expected, rtol=0, atol=0)


def test_openvino_gives_onnx_runtimes_answer(encoder_file, tiny):
    assert_openvino_agrees(encoder_file, [grid_inputs(tiny, grid, seed)[::-1] for seed, grid in enumerate(PARITY_GRIDS)])


def test_openvino_runs_onnx_files_only(encoder_file, tmp_path):
    with pytest.raises(UsageError, match="choose from onnxruntime, openvino"):
        load(encoder_file, runtime="tensorrt")
    program = tmp_path / "encoder.pt2"
    program.write_bytes(b"")
    with pytest.raises(UsageError, match="OpenVINO runs .onnx files"):
        load(program, runtime="openvino")


def test_openvino_missing_is_one_line_naming_the_extra(encoder_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what `import openvino` meets where it is not installed
    with pytest.raises(UsageError, match=r"OpenVINO is not installed here: pip install 'ipcv-export\[openvino\]'"):
        load(encoder_file, runtime="openvino")


def test_pixel_bounds_change_the_token_count(encoder_file):
    encoder = load(encoder_file)
    photo = _photo(448, 448, 2)
    small, large = encoder.encode_images([photo], max_pixels=112 * 112)[0], encoder.encode_images([photo])[0]
    assert len(small) == 16 and len(large) == 256  # 112/14 = 8 -> 8x8/4; 448/14 = 32 -> 32x32/4


def test_encode_images_needs_the_manifest(encoder_file, tmp_path):
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(encoder_file.read_bytes())
    with pytest.raises(ValueError, match="no manifest"):
        load(lone).encode_images([_photo(56, 56, 3)])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_give_nan_never_an_index_error(encoder_file, tiny, bad):
    """A NaN or inf pixel poisons its image as in the stock module, and never the selection's
    indices (ONNX Runtime failed with an out-of-range scatter before scores were made rankable).
    In a call of several images the dense masked attention multiplies the poisoned image's values
    by zero weights (0 x NaN = NaN), so the whole call is NaN: the README says to split the call."""
    for grid in ([[1, 8, 8]], [[1, 8, 8], [1, 12, 16]]):
        grid_thw = torch.tensor(grid)
        pixels = torch.randn(int(grid_thw.prod(-1).sum()), tiny.input_width, generator=torch.Generator().manual_seed(4))
        pixels[5, 7] = bad
        embeddings = load(encoder_file)(pixels, grid_thw)
        with torch.no_grad():
            stock = stock_reference(tiny.module, pixels, grid_thw)
        assert embeddings.shape == stock.shape and stock[:16].isnan().all() and not stock[16:].isnan().any()
        assert embeddings.isnan().all()


def test_bad_files_images_and_providers_are_one_line_usage_errors(encoder_file, tmp_path):
    with pytest.raises(UsageError, match="cannot load encoder.onnx.json: supported formats"):
        load(f"{encoder_file}.json")
    with pytest.raises(UsageError, match="the image processor refused an image: "):
        load(encoder_file).encode_images([_photo(1, 1000, 5)])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(encoder_file.read_bytes())
    for content, message in (("{not json", "is not valid JSON"), ("[1]", "must hold a JSON object")):
        (tmp_path / "broken.onnx.json").write_text(content)
        with pytest.raises(UsageError, match=message):
            load(broken)
    assert load(encoder_file, providers="CPUExecutionProvider").session.get_providers() == ["CPUExecutionProvider"]
