"""Gemma 4's vision tower, a padded tower: files take the processor's pixel_values and
image_position_ids, equal the stock module at rho = 1 for any amount of padding, and with IPCV
equal the reference, which never lets padding into a block; padding is never chosen over a real
patch, never a neighbour, and K counts real patches only."""

import json

import numpy as np
import pytest
import torch
from conftest import assert_openvino_agrees, verified_files
from PIL import Image
from safetensors.torch import save_file

from ipcv_export import load
from ipcv_export.capture import capture
from ipcv_export.checkpoint import CheckpointError
from ipcv_export.compress import compress
from ipcv_export.config import ShapeProfile
from ipcv_export.flops import program_flops
from ipcv_export.layouts.padded import padded_inputs
from ipcv_export.loading import load_encoder
from ipcv_export.lower import tensorrt
from ipcv_export.models.gemma4 import stock_features
from ipcv_export.verify import check_padded_parity

STOCK_TOLERANCE = 1e-5
CASES = [([(6, 6)], 36),  # one image, no padding
         ([(9, 3), (3, 3)], 45),  # two images, one of them mostly padding
         ([(12, 6), (3, 6), (6, 9), (3, 3)], 90),  # four images of different sizes
         ([(3, 3)], 81)]  # one small image in a long row: 8 of 9 cells padding
"""(columns, rows) of each image in patches (multiples of k = 3), and the padded length P."""


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(encoder, {retention: (path, manifest)}): one verified ONNX file per retention, with the
    kept and neighbour indices."""
    encoder = load_encoder("tiny-gemma4")
    return encoder, verified_files(encoder, tmp_path_factory.mktemp("gemma4"))


def _stock_rows(encoder, pixels, positions) -> list[torch.Tensor]:
    """The stock module's soft tokens (get_image_features: tower, then embedder), split per image."""
    flat = stock_features(encoder.module, pixels, positions)
    soft = ((positions != -1).any(-1).sum(-1) // encoder.merge_size ** 2).tolist()
    return list(flat.split(soft))


def test_rho1_file_equals_the_stock_module(gemma):
    """Each image's soft tokens within 1e-5 of the stock module's, the rows after them zero."""
    encoder, files = gemma
    file = load(files[1.0][0])
    generator = torch.Generator().manual_seed(0)
    for grids, length in CASES:
        pixels, positions = padded_inputs(grids, length, encoder.input_width, generator)
        ours = file(pixels, positions)
        assert ours.shape == (len(grids), length // 9, 48)
        for image, theirs in enumerate(_stock_rows(encoder, pixels, positions)):
            assert (ours[image, :len(theirs)] - theirs).abs().max() <= STOCK_TOLERANCE, (grids, image)
            assert not ours[image, len(theirs):].any()


def test_processor_output_runs_as_it_comes(gemma):
    """Two photos through transformers' Gemma 4 processor (the manifest's settings): the rho = 1
    file's soft tokens per image are the stock module's, the rho = 0.5 file's the reference's."""
    encoder, files = gemma
    file = load(files[1.0][0])
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((90, 140), (200, 48))]
    pixels, positions = file.preprocess(photos)
    assert positions.shape[1] == encoder.native_patches and (positions == -1).any()
    for ours, theirs in zip(file.encode_images(photos), _stock_rows(encoder, pixels, positions)):
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= STOCK_TOLERANCE
    parts = encoder.description.padded.parts(encoder.module)
    check_padded_parity(load(files[0.5][0]).run_all, parts, encoder.method_config(retention=0.5),
                        pixels, positions)  # and the IPCV file equals the reference on them


def test_ipcv_file_equals_the_reference_and_passes_the_tensorrt_check(gemma):
    """Kept set exact, neighbours as the reference's, soft tokens within 1e-4, for every amount of padding."""
    encoder, files = gemma
    path, manifest = files[0.5]
    assert manifest["verification"]["verified"] and manifest["tensorrt_compat"]["ok"], manifest["tensorrt_compat"]
    assert manifest["int32"]["ok"], manifest["int32"]["findings"]  # at the manifest's largest calls
    assert [t["name"] for t in manifest["inputs"]["tensors"]] == ["pixel_values", "image_position_ids"]
    file = load(path)
    config = encoder.method_config(retention=0.5)
    generator, parts = torch.Generator().manual_seed(1), encoder.description.padded.parts(encoder.module)
    for grids, length in CASES:
        pixels, positions = padded_inputs(grids, length, encoder.input_width, generator)
        check_padded_parity(file.run_all, parts, config, pixels, positions)


def test_openvino_gives_onnx_runtimes_answer(gemma):
    """Padded rows of images of different sizes, in OpenVINO CPU f32."""
    encoder, files = gemma
    generator = torch.Generator().manual_seed(0)
    calls = [padded_inputs(grids, length, encoder.input_width, generator) for grids, length in CASES]
    for path, _ in files.values():
        assert_openvino_agrees(path, calls)


def test_padding_is_never_kept_over_a_patch_nor_a_neighbour(gemma):
    """Per image: exactly max(V // 2, 1) real patches kept, padding only in the slots after them;
    no removed patch has a padding neighbour, and removed padding has none (index K)."""
    encoder, files = gemma
    file = load(files[0.5][0])
    grids, length = CASES[2]
    pixels, positions = padded_inputs(grids, length, encoder.input_width)
    _, kept, neighbors = file.run_all(pixels, positions)
    slots = length // 2
    assert kept.shape == (len(grids), slots)
    for image, (cols, rows) in enumerate(grids):
        real = cols * rows
        own = max(real // 2, 1)
        assert int((kept[image] < real).sum()) == own
        assert torch.equal(kept[image, own:], torch.arange(real, real + slots - own))
        removed_real = real - own
        chosen = neighbors[image, :removed_real]  # indices into kept_index: real patches, or K past the image's own
        assert ((chosen < own) | (chosen == slots)).all() and (chosen[:, 0] < own).all()
        assert ((chosen < own).sum(-1) == min(own, chosen.shape[-1])).all()
        assert (neighbors[image, removed_real:] == slots).all()


def test_engine_profile_and_defaults_fit_the_padded_length(gemma):
    """The profile's defaults are rounded to multiples of 9 (72 / 2520 / 16380), and an engine's
    profile gives both inputs [images, P, ...] at those lengths."""
    _, files = gemma
    manifest = files[0.5][1]
    assert manifest["profile"] == {"min_tokens": 72, "opt_tokens": 2520, "max_tokens": 16380}
    shapes = tensorrt.profile_shapes(manifest["inputs"], ShapeProfile(**manifest["profile"]))
    most = tensorrt.ENGINE_MAX_IMAGES
    assert shapes == {"pixel_values": ((1, 72, 768), (1, 2520, 768), (most, 16380, 768)),
                      "image_position_ids": ((1, 72, 2), (1, 2520, 2), (most, 16380, 2))}


def test_bad_inputs_are_refused_in_one_line(gemma):
    encoder, files = gemma
    file = load(files[0.5][0])
    pixels, positions = padded_inputs([(6, 3)], 27, encoder.input_width)
    late = positions.clone()
    late[0, [0, 20]] = late[0, [20, 0]]  # a padding row before a real one
    far = positions.clone()
    far[0, 0] = torch.tensor([256, 0])  # beyond the 256-row position table
    for args, message in (((pixels[:, :26], positions[:, :26]), "multiple of 9"),
                          ((pixels, positions.int()), "must be int64"),
                          ((pixels, late), "real patches first"),
                          ((pixels, far), r"must lie in \[0, 256\)"),
                          ((pixels[..., :10], positions), "must have shape")):
        with pytest.raises(ValueError, match=message) as refused:
            file(*args)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_counted_flops_are_the_cost_model(gemma, retention):
    """One image of P patches (fake tensors): counted == modelled, the pooler's product included."""
    encoder, _ = gemma
    config = encoder.method_config(retention=retention)
    program = compress(capture(encoder), encoder, config)
    for tokens in (252, 1008):
        assert program_flops(program, encoder, tokens) == encoder.description.flop_floor(
            encoder.module.config, config.retention_e4, config.prune_layer, config.as_depth, tokens), tokens


def test_checkpoint_round_trip(tmp_path):
    """The vision tower and the embedder come back from a full-model folder (language weights
    beside them are not read); the same architecture, equal tensors."""
    from ipcv_export.models import CONFIG_DIR

    encoder = load_encoder("tiny-gemma4")
    config = json.loads((CONFIG_DIR / "tiny-gemma4.json").read_text())["config"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = {f"model.{key}": value.contiguous() for key, value in encoder.module.state_dict().items()}
    state["model.language_model.embed_tokens.weight"] = torch.zeros(10, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"patch_size": 16, "pooling_kernel_size": 3,
                                                                    "max_soft_tokens": 70}))
    loaded = load_encoder(str(tmp_path))
    assert loaded.description is encoder.description
    for key, value in encoder.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    assert loaded.native_patches == 630  # the checkpoint's soft-token budget sets the processor's padded length
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"pooling_kernel_size": 2}))
    with pytest.raises(CheckpointError, match="pooling_kernel_size 2 differs from the vision tower's 3"):
        load_encoder(str(tmp_path))
