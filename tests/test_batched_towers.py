"""Towers that batch whole images (DINOv2; LLaVA's CLIP + projector) through the same passes.

Tolerances: the captured stock tower equals transformers' forward within 1e-5 (the only
difference is the position table's bicubic resize at the native size, an identity up to
rounding); IPCV programs make the reference's discrete choices exactly and match its outputs
within 1e-5 (same operations, different kernels); ONNX files within the parity gate's 1e-4.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_openvino_agrees
from ipcv_export import Method, Target, export, load
from ipcv_export.capture import capture
from ipcv_export.compress import compress
from ipcv_export.config import IpcvConfig
from ipcv_export.flops import program_flops
from ipcv_export.lower.tensorrt import tensorrt_available
from ipcv_export.loading import load_encoder
from ipcv_export.reference import batched_reference, mixed_reference


def _stock_dinov2(model, pixels):
    return model(pixels).last_hidden_state


def _stock_llava(side, pixels):
    """get_image_features of LLaVA-1.5 / LLaVA-OneVision (one tile per image): the feature layer's
    hidden states (without the first token for the "default" strategy), projected."""
    interpolate = pixels.shape[-1] != side.config.vision_config.image_size or pixels.shape[-2] != pixels.shape[-1]
    out = side.vision_tower(pixels, interpolate_pos_encoding=interpolate, output_hidden_states=True)
    features = out.hidden_states[side.config.vision_feature_layer]
    if side.config.vision_feature_select_strategy == "default":
        features = features[:, 1:]
    return side.multi_modal_projector(features)


def _stock_internvl(side, pixels):
    """get_image_features of InternVL, with the grid's true shape (the stock method assumes square
    tiles; its pixel_shuffle does not): the last layer's patch tokens, pixel-shuffled, projected."""
    from transformers.models.internvl.modeling_internvl import InternVLModel

    features = side.vision_tower(pixels).last_hidden_state[:, 1:]
    grid = features.reshape(len(pixels), pixels.shape[2] // 14, pixels.shape[3] // 14, -1)
    shuffled = InternVLModel.pixel_shuffle(None, grid, scale_factor=side.config.downsample_ratio)
    return side.multi_modal_projector(shuffled.reshape(len(pixels), -1, shuffled.shape[-1]))


STOCK = {"tiny-dinov2": _stock_dinov2, "tiny-llava-clip": _stock_llava, "tiny-llava-onevision-siglip": _stock_llava,
         "tiny-internvl": _stock_internvl}
SIZES = [(1, 8, 8), (2, 5, 7), (3, 12, 9)]  # (images, rows, columns) of 14-px patches; 8 x 8 is the native grid


def _pixels(images: int, rows: int, cols: int, seed: int = 0, multiple: int = 1) -> torch.Tensor:
    """Seeded images of rows x columns patches, each side rounded up to the tower's grid multiple."""
    rows, cols = (-(-side // multiple) * multiple for side in (rows, cols))
    return torch.randn(images, 3, rows * 14, cols * 14, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(STOCK))
def dino(request):
    return load_encoder(request.param)


@pytest.fixture(scope="module")
def dino_captured(dino):
    return capture(dino)


def _across(encoder) -> bool:
    return encoder.description.image_batch.neighbors_across_images


def _stock(encoder, pixels):
    with torch.no_grad():
        return STOCK[encoder.source["builtin"]](encoder.module, pixels)


@pytest.mark.parametrize("size", SIZES)
def test_captured_tower_equals_transformers_forward(dino, dino_captured, size):
    pixels = _pixels(*size, multiple=dino.merge_size)
    torch.testing.assert_close(dino_captured.module()(pixels), _stock(dino, pixels), rtol=0, atol=1e-5)


def test_reference_at_full_retention_is_the_stock_tower(dino):
    pixels = _pixels(2, 6, 10)
    parts = dino.description.image_batch.parts(dino.module)
    result = batched_reference(parts, dino.special_tokens, pixels, IpcvConfig(retention=1.0))
    torch.testing.assert_close(result.embeddings, _stock(dino, pixels), rtol=0, atol=1e-5)
    assert result.neighbors.shape == (2, 0, 10)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_image_poisons_only_itself(dino, dino_captured, bad):
    """Scores are made rankable (NaN as 0), so a NaN or inf pixel in image 2 of 3 leaves valid
    indices and the stock module's NaN pattern; with neighbours across images (InternViT) the
    other images' removed tokens may be rebuilt from the poisoned one's, so NaN may spread there."""
    program = compress(dino_captured, dino, IpcvConfig(0.5, 2, 2, 3)).module()
    pixels = _pixels(3, 6, 8, seed=5, multiple=dino.merge_size)
    pixels[1, 0, 3, 9] = bad
    tokens, keep, neighbors = program(pixels)
    stock = _stock(dino, pixels)
    poisoned = stock.isnan().flatten(1).any(-1)
    assert poisoned.tolist() == [False, True, False] and tokens[1].isnan().all()
    if not _across(dino):
        assert torch.equal(tokens.isnan(), stock.isnan())
    assert torch.equal(keep.sort(-1).values, keep) and (neighbors >= 0).all()
    assert (neighbors <= (keep.numel() if _across(dino) else keep.shape[1])).all()  # the last: padding (reads zeros)


@pytest.mark.parametrize("config", [IpcvConfig(0.5, 3, 2, 4), IpcvConfig(0.35, 1, 7, 10), IpcvConfig(0.2, 2, 0, 3),
                                    IpcvConfig(0.35, 2, 2, 3, "spread"), IpcvConfig(0.35, 2, 2, 4, ngr_weighting="similarity"),
                                    IpcvConfig(0.5, 2, 2, 3, "hybrid"), IpcvConfig(0.35, 2, 3, 3, "bipartite"),
                                    IpcvConfig(0.2, 2, 3, 1, "merge")],
                         ids=["rho0.5", "rho0.35-lp1-as-to-end", "rho0.2-no-as", "rho0.35-spread", "rho0.35-similarity",
                              "rho0.5-hybrid", "rho0.35-bipartite", "rho0.2-merge"])
def test_ipcv_program_equals_the_batched_reference(dino, dino_captured, config):
    config.check(dino.depth)
    program = compress(dino_captured, dino, config).module()
    parts = dino.description.image_batch.parts(dino.module)
    for seed, size in enumerate(SIZES):
        pixels = _pixels(*size, seed=seed, multiple=dino.merge_size)
        tokens, keep, neighbors = program(pixels)
        reference = batched_reference(parts, dino.special_tokens, pixels, config, across_images=_across(dino))
        patches = pixels.shape[2] * pixels.shape[3] // 14 ** 2
        assert keep.shape == (size[0], dino.special_tokens + patches * config.retention_e4 // 10_000)
        assert torch.equal(keep, reference.keep)
        assert torch.equal(neighbors[..., :reference.neighbors.shape[-1]], reference.neighbors)
        torch.testing.assert_close(tokens, reference.embeddings, rtol=0, atol=1e-5)


def test_selection_is_per_image_and_keeps_cls(dino, dino_captured):
    program = compress(dino_captured, dino, IpcvConfig(0.35, 3, 2, 4)).module()
    first, second = _pixels(1, 8, 8, seed=1), _pixels(1, 8, 8, seed=2)
    _, keep_pair, _ = program(torch.cat([first, second]))
    _, keep_first, _ = program(first)
    _, keep_second, _ = program(second)
    assert torch.equal(keep_pair, torch.cat([keep_first, keep_second]))  # images do not affect each other
    if dino.special_tokens:
        assert (keep_pair[:, 0] == 0).all()  # CLS first, always kept
    assert not torch.equal(keep_pair[0], keep_pair[1])


@pytest.mark.parametrize("selection", ["score", "bipartite", "merge"])
def test_flop_count_equals_the_cost_model(dino, dino_captured, selection):
    config = IpcvConfig(0.35, 2, 3, 1 if selection == "merge" else 10, selection)
    program = compress(dino_captured, dino, config)
    floor = dino.description.flop_floor
    for patches in (64, 120):
        config.check(dino.depth)
        assert program_flops(program, dino, patches) == floor(dino.module.config, config.retention_e4, 2, 3, patches,
                                                             selection)
        assert program_flops(dino_captured, dino, patches) == floor(dino.module.config, 10_000, 2, 3, patches)


@pytest.fixture(scope="module")
def dino_mixed(dino, dino_captured):
    """The rho = 0.4 mixed-resolution program (mixed_resolution.py): its own capture, no passes."""
    config = dino.method_config(retention=0.4, selection="mixed").check(dino.depth)
    return config, compress(dino_captured, dino, config)


def test_mixed_program_equals_the_mixed_reference(dino, dino_mixed):
    """Mixed-resolution tokens in the graph make the reference's choice of fine cells and rebuild
    the same tokens (1e-5), on even and odd grids (patches outside every cell) and batches."""
    config, program = dino_mixed
    parts = dino.description.image_batch.parts(dino.module)
    for seed, size in enumerate([(1, 8, 8), (2, 9, 13), (3, 12, 10), (1, 16, 11)]):
        pixels = _pixels(*size, seed=seed, multiple=dino.merge_size)
        tokens, keep, owners = program.module()(pixels)
        reference = mixed_reference(parts, dino.special_tokens, pixels, config.retention)
        assert torch.equal(keep, reference.keep) and torch.equal(owners, reference.neighbors)
        torch.testing.assert_close(tokens, reference.embeddings, rtol=0, atol=1e-5)


def test_mixed_flop_count_equals_the_cost_model(dino, dino_mixed):
    config, program = dino_mixed
    for patches in (64, 81, 144):  # 9 x 9: a last row and column outside the cells
        if patches % dino.merge_size ** 2:
            continue
        assert program_flops(program, dino, patches) == dino.description.flop_floor(
            dino.module.config, config.retention_e4, config.prune_layer, config.as_depth, patches, "mixed")


@pytest.fixture(scope="module")
def dino_file(dino, tmp_path_factory):
    out = tmp_path_factory.mktemp("batched") / "tower.onnx"
    result = export(dino, Target(out, diagnostic_outputs=True), Method(retention=0.35, as_depth=2),  # reads kept_index
                    report=lambda _line: None)
    return out, result.manifest


def test_onnx_file_is_verified_and_runs_image_batches(dino, dino_file):
    path, manifest = dino_file
    assert manifest["verification"]["verified"] and manifest["verification"]["worst_abs_diff"] <= 1e-4
    assert manifest["inputs"]["layout"] == "images" and manifest["inputs"]["special_tokens"] == dino.special_tokens
    assert manifest["int32"]["ok"] and manifest["int32"]["calls"] == ["images"], manifest["int32"]["findings"]
    encoder = load(path)
    pixels = _pixels(2, 6, 9, seed=5, multiple=dino.merge_size)
    tokens, keep, _ = encoder.run_all(pixels)
    config = IpcvConfig(**manifest["ipcv"])  # the family's defaults where not given (InternViT: l_p 7)
    assert (config.retention, config.prune_layer, config.as_depth) == (0.35, dino.method_config().prune_layer, 2)
    reference = batched_reference(dino.description.image_batch.parts(dino.module), dino.special_tokens, pixels,
                                  config, across_images=_across(dino))
    assert torch.equal(keep, reference.keep)
    torch.testing.assert_close(tokens, reference.embeddings, rtol=0, atol=1e-4)


def test_openvino_gives_onnx_runtimes_answer(dino, dino_file):
    """Batches of images of other sizes than the native grid, in OpenVINO CPU f32."""
    path, _ = dino_file
    assert_openvino_agrees(path, [(_pixels(*size, seed=seed, multiple=dino.merge_size),)
                                  for seed, size in enumerate(SIZES)])


def test_full_retention_file_is_the_stock_tower_and_keeps_every_token(dino, tmp_path):
    """rho = 1: nothing pruned; kept_index lists every token (CLS included, even where the head drops it)."""
    result = export(dino, Target(tmp_path / "full.pt2", format="exported-program"), Method(retention=1.0),
                    report=lambda _line: None)
    assert result.manifest["verification"]["verified"]
    pixels = _pixels(2, 6, 9, seed=7, multiple=dino.merge_size)
    tokens, keep, neighbors = load(tmp_path / "full.pt2").run_all(pixels)
    torch.testing.assert_close(tokens, _stock(dino, pixels), rtol=0, atol=1e-5)
    patches = pixels.shape[2] * pixels.shape[3] // 14 ** 2
    assert torch.equal(keep, torch.arange(dino.special_tokens + patches).expand(2, -1)) and neighbors.shape == (2, 0, 10)
    image = torch.zeros(1, 3, 112, 112)
    with pytest.raises(ValueError, match="at most 256 images per call, got 257"):
        load(tmp_path / "full.pt2").run_all(image.expand(257, -1, -1, -1))
    with pytest.raises(ValueError, match=r"image sides may be at most 1792 pixels for this file, got \[1806, 112\]"):
        load(tmp_path / "full.pt2").run_all(torch.zeros(1, 3, 1806, 112).expand(1, -1, -1, -1))
    manifest = json.loads((tmp_path / "full.pt2.json").read_text())
    del manifest["inputs"]["merge_size"]
    (tmp_path / "full.pt2.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="manifest full.pt2.json lacks 'merge_size' under inputs"):
        load(tmp_path / "full.pt2")


@pytest.mark.parametrize("shape, message", [((2, 3, 100, 112), "must be multiples of"),
                                            ((2, 3, 14, 112), "too small"), ((3, 112, 112), r"\[B, 3, H, W\]")])
def test_bad_image_batches_are_refused(dino_file, shape, message):
    with pytest.raises(ValueError, match=message):
        load(dino_file[0])(torch.zeros(shape))


def test_engine_profile_spans_images_and_grid_sizes(dino):
    """An engine of a batched tower gets one profile over (images, height, width): 1 to 16 images,
    sides from the min to the max patches per image, tuned for the native size; trtexec is told
    the same shapes."""
    from ipcv_export.config import ShapeProfile
    from ipcv_export.lower import tensorrt

    inputs = {"layout": "images", "input_width": 3, "patch_size": 14, "merge_size": dino.merge_size}
    shapes = tensorrt.profile_shapes(inputs, ShapeProfile(64, dino.native_patches, 16384))
    assert shapes == {"pixel_values": ((1, 3, 112, 112), (1, 3, 112, 112), (16, 3, 1792, 1792))}
    command = tensorrt.trtexec_command(Path("t.onnx"), Path("t.engine"), shapes, "fp16")
    assert "--minShapes=pixel_values:1x3x112x112" in command and "--maxShapes=pixel_values:16x3x1792x1792" in command


@pytest.mark.skipif(tensorrt_available(), reason="tensorrt is installed: the missing-TensorRT path cannot run")
def test_engine_request_without_tensorrt_keeps_the_checked_onnx(tmp_path):
    """InternViT (cross-tile neighbours, pixel shuffle): the file passes the static TensorRT check."""
    from ipcv_export.lower.tensorrt import TensorRTMissing

    with pytest.raises(TensorRTMissing, match="maxShapes=pixel_values:16x3x1792x1792"):
        export("tiny-internvl", Target(tmp_path / "tower.engine", precision="fp16"), report=lambda _line: None)
    manifest = json.loads((tmp_path / "tower.onnx.json").read_text())
    assert manifest["verification"]["verified"] and manifest["tensorrt_compat"]["ok"], manifest["tensorrt_compat"]
    assert manifest["profile"]["opt_tokens"] == 64  # the tiny tower's native 8 x 8 grid
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tower.onnx", "tower.onnx.json"]


@pytest.mark.parametrize("builtin, model_class", [("tiny-llava-clip", "LlavaForConditionalGeneration"),
                                                  ("tiny-llava-onevision-siglip", "LlavaOnevisionForConditionalGeneration"),
                                                  ("tiny-internvl", "InternVLForConditionalGeneration")])
def test_llava_checkpoint_folder_loads_tower_and_projector_only(builtin, model_class, tmp_path):
    """A LLaVA or InternVL folder saved by transformers: the tower and projector load, the LLM is never read."""

    import transformers

    from ipcv_export.checkpoint import load_checkpoint_encoder
    from ipcv_export.models import CONFIG_DIR

    spec = json.loads((CONFIG_DIR / f"{builtin}.json").read_text())["config"]
    torch.manual_seed(3)
    cls = getattr(transformers, model_class)
    full = cls(cls.config_class(**spec)).eval()
    full.save_pretrained(tmp_path)
    loaded = load_checkpoint_encoder(tmp_path)
    assert loaded.description.architecture == json.loads((CONFIG_DIR / f"{builtin}.json").read_text())["architecture"]
    assert {key.split(".")[0] for key in loaded.module.state_dict()} == {"vision_tower", "multi_modal_projector"}
    pixels = _pixels(2, 8, 8)
    with torch.no_grad():
        ours = STOCK[builtin](loaded.module, pixels)
        theirs = STOCK[builtin](full.model, pixels)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    if builtin == "tiny-llava-clip":  # and the model's own entry point agrees with the test's reading of it
        with torch.no_grad():
            features = full.model.get_image_features(pixels, vision_feature_layer=-2,
                                                     vision_feature_select_strategy="default").pooler_output
        torch.testing.assert_close(ours, torch.stack(list(features)), rtol=0, atol=1e-6)


def test_internvl_reading_is_get_image_features():
    """The test's reading of InternVL (any grid) is the model's own entry point on square tiles."""
    from transformers import InternVLConfig, InternVLModel

    encoder = load_encoder("tiny-internvl")
    model = InternVLModel(InternVLConfig(**encoder.module.config.to_dict())).eval()
    model.load_state_dict(encoder.module.state_dict(), strict=False)
    for side in (8, 12):
        pixels = _pixels(2, side, side, seed=side)
        with torch.no_grad():
            theirs = model.get_image_features(pixels).pooler_output
        torch.testing.assert_close(_stock_internvl(encoder.module, pixels), theirs, rtol=0, atol=1e-6)


def test_internvl_neighbours_come_from_every_tile():
    """ipcv.md: InternViT searches neighbours among the kept tokens of all tiles of a call, so a
    tile's removed tokens may take neighbours from another tile; with one tile the result is the
    per-image search."""
    encoder = load_encoder("tiny-internvl")
    program = compress(capture(encoder), encoder, IpcvConfig(0.35, 2, 2, 10)).module()
    pixels = _pixels(3, 8, 8, seed=4)
    _, keep, neighbors = program(pixels)
    kept_per_tile = keep.shape[1]
    owner = torch.div(neighbors, kept_per_tile, rounding_mode="floor")
    assert (owner != torch.arange(3)[:, None, None]).any()
    assert neighbors.max() < 3 * kept_per_tile
    _, keep_one, neighbors_one = program(pixels[:1])
    reference = batched_reference(encoder.description.image_batch.parts(encoder.module), 1, pixels[:1],
                                  IpcvConfig(0.35, 2, 2, 10))
    assert torch.equal(neighbors_one, reference.neighbors)


def test_grid_sides_must_be_multiples_of_the_grid_multiple(dino, dino_file):
    """InternVL's pixel shuffle folds 2 x 2 patches: its files refuse odd grids; the others take them."""
    odd = torch.zeros(1, 3, 9 * 14, 8 * 14)
    if dino.merge_size == 1:
        assert load(dino_file[0])(odd).shape[0] == 1
    else:
        with pytest.raises(ValueError, match=r"multiples of 28 \(2 patches of 14\)"):
            load(dino_file[0])(odd)
