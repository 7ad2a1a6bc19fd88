"""The command line: the main job, one-line refusals, exit codes, nothing written on failure."""

import io
import json
import subprocess
import sys

import pytest
import torch

from ipcv_export import Method, Target, UsageError, export, load
from ipcv_export.cli import EXIT_USAGE, build_parser, main, method_and_target


def test_export_writes_a_verified_file_and_manifest(tiny, tmp_path):
    out = tmp_path / "encoder.onnx"
    lines = []
    result = export(tiny, Target(out, atol=5e-4), Method(retention=0.5), report=lines.append)
    manifest = json.loads((tmp_path / "encoder.onnx.json").read_text())
    assert result.path == out and manifest["verification"]["verified"]
    assert manifest["ipcv"]["as_depth"] == 3  # the default 7 from l_p = 3 on 6 blocks: what runs is recorded
    assert "  AS depth 7 reaches past the last block: the 3 blocks after l_p=3 are stabilised (recorded as 3)" in lines
    assert all(c["max_abs_diff"] <= 1e-4 for c in manifest["verification"]["checks"])
    assert manifest["verification"]["tolerance"]["atol"] == 5e-4 and all(c["limit"] == 5e-4 for c in manifest["verification"]["checks"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.onnx", "encoder.onnx.json"]
    assert oct(out.stat().st_mode & 0o044) == oct(0o044)
    stages = [line.split(" ")[0].rstrip(":") for line in lines if line.endswith(" s")]
    assert stages == ["load", "capture", "passes", "lower", "check", "verify", "write"]
    assert lines[-1].startswith(f"wrote {out} (") and "expected compute 0." in lines[-1]
    assert manifest["compute"]["ratio"] == pytest.approx(manifest["compute"]["flops_ipcv"] / manifest["compute"]["flops_original"], abs=1e-4)
    assert manifest["source"] == {"builtin": "tiny-qwen2-vl", "seed": 0, "random_weights": True}
    assert [t["name"] for t in manifest["inputs"]["tensors"]] == ["pixel_values", "image_grid_thw"]
    assert manifest["tensorrt_compat"]["ok"] and set(manifest["timings_s"]) >= {"lower", "verify"}
    assert [o["name"] for o in manifest["outputs"]] == ["image_features"]
    encoder = load(out)
    assert [o.name for o in encoder.session.get_outputs()] == ["image_features"]  # what a runtime reads, alone
    grid = torch.tensor([[1, 16, 16]])
    assert encoder(torch.randn(256, tiny.input_width), grid).shape == (64, 48)


@pytest.mark.parametrize("argv, message", [
    (["--retention", "0"], "retention must be in (0, 1]"),
    (["--retention", "-0.5"], "retention must be in (0, 1]"),
    (["--retention", "1.5"], "retention must be in (0, 1]"),
    (["--retention", "half"], "'half' is not a number"),
    (["--prune-layer", "6"], "prune layer must be in [1, 5]"),
    (["--prune-layer", "0"], "prune layer must be in [1, 5]"),
    (["--as-depth", "-1"], "AS depth must be >= 0"),
    (["--neighbors", "0"], "neighbors must be >= 1"),
    (["--neighbors", "5000"], "neighbors must be at most 3840 here"),
    (["--opt-patches", "256", "--max-patches", "256", "--neighbors", "200"], "neighbors must be at most 128 here"),
    (["--timing-cache", "{tmp}/t.cache"], "--timing-cache applies to TensorRT engines"),
    (["--atol", "-1"], "--atol must be in [0, 1), got -1.0"),
    (["--model", "tiny-dinov2", "--per-image-selection", "yes"], "per-image selection applies to packed towers"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "Qwen/Qwen2-VL-7B-Instruct"], "hub ids are not fetched"),
    (["--retention", "0.0001"], "this retention keeps K >= 1 token only from 10000 patches per call (image) on"),
    (["-o", "{tmp}/missing/encoder.onnx"], "does not exist"),
    (["-o", "{tmp}/encoder.xyz"], "unsupported output format"),
    (["--selection", "spread"], "spread selection is implemented for towers that batch whole images"),
    (["--model", "tiny-dinov2", "--selection", "merge", "--neighbors", "3"], "neighbors must be 1, got 3"),
    (["--budget", "0.5", "--neighbors", "3"], "--budget chooses the method settings itself; drop --neighbors"),
    (["--budget", "0.7", "--reten", "0.3"], "unrecognized arguments: --reten 0.3"),
    (["--budget", "1.5"], "--budget must be in (0, 1]"),
    (["--budget", "0.01"], "no measured setting fits a budget of 0.01"),
    (["-o", "{tmp}/e.engine", "--runtime", "onnxruntime"], "an engine is for tensorrt"),
    (["-o", "{tmp}/e.pt2", "--runtime", "tensorrt"], "--runtime tensorrt chooses the form of an ONNX file"),
    (["--runtime", "trt"], "argument --runtime: invalid choice: 'trt'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(argv, message, tmp_path, capsys):
    base = {"--model": "tiny-qwen2-vl", "-o": str(tmp_path / "encoder.onnx")}
    args = dict(zip(argv[::2], (a.replace("{tmp}", str(tmp_path)) for a in argv[1::2])))
    full = [x for kv in {**base, **args}.items() for x in kv if x != "yes"]  # "yes": a flag without a value
    assert main(full) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_flags_map_onto_the_method_and_the_target():
    """Every method flag lands in Method, every target flag in Target; unset flags keep their defaults."""
    args = build_parser().parse_args(["--model", "m", "-o", "e.engine", "--retention", "0.3", "--prune-layer", "2",
                                      "--as-depth", "4", "--neighbors", "6", "--selection", "merge",
                                      "--ngr-weighting", "similarity", "--per-image-selection", "--mixed-cell", "3",
                                      "--format", "engine", "--runtime", "tensorrt", "--precision", "fp16",
                                      "--opset", "20", "--min-patches", "128", "--opt-patches", "1024",
                                      "--max-patches", "4096", "--timing-cache", "t.cache", "--diagnostic-outputs",
                                      "--skip-verify", "--atol", "0.001"])
    assert method_and_target(args) == (
        Method(0.3, 2, 4, 6, "merge", "similarity", True, 3),
        Target("e.engine", "engine", "tensorrt", "fp16", 20, 128, 1024, 4096, "t.cache", True, False, 0.001))
    assert method_and_target(build_parser().parse_args(["--model", "m", "-o", "e.onnx"])) == (Method(), Target("e.onnx"))
    budget = build_parser().parse_args(["--model", "m", "-o", "e.onnx", "--budget", "0.4"])
    assert method_and_target(budget) == (Method(budget=0.4), Target("e.onnx"))


def test_the_api_refuses_a_budget_beside_settings_as_the_command_line_does():
    with pytest.raises(UsageError, match="a budget chooses the method settings itself; drop retention, selection"):
        Method(retention=0.3, selection="spread", budget=0.4)


def test_unwritable_output_folder(tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    if subprocess.run(["test", "-w", str(folder)]).returncode == 0:
        pytest.skip("running as a user who can write anywhere (root): permissions cannot be tested")
    assert main(["--model", "tiny-qwen2-vl", "-o", str(folder / "e.onnx")]) == EXIT_USAGE


def test_runtime_refuses_bad_calls(tiny, tmp_path):
    out = tmp_path / "encoder.onnx"
    export(tiny, Target(out, verify=False), report=lambda _line: None)
    encoder = load(out)
    good = torch.randn(64, tiny.input_width)
    grid = torch.tensor([[1, 8, 8]])
    for pixels, grid_thw, message in [
        (good[:60], grid, "60 rows but grid_thw describes 64"),
        (good[:, :10], grid, "must have shape"),
        (good.double(), grid, "must be float32"),
        (good, torch.tensor([[1, 8, 7]]), "multiples of the merge size"),
        (good, torch.tensor([[1, 8, 8]], dtype=torch.int32), "must be int64, as the file declares image_grid_thw"),
        (good, torch.tensor([[1, -8, -8]]), "positive integers"),
        (good, torch.tensor([[1, 8, 8], [1, 2, 2]]), "64 rows but grid_thw describes 68"),
        (good[:1].expand(66048, -1), torch.tensor([[1, 8, 8256]]), "at most 65536 patches per call, got 66048"),
    ]:
        with pytest.raises(ValueError, match=message):
            encoder(pixels, grid_thw)


def test_cli_entry_point_help_and_list():
    run = subprocess.run([sys.executable, "-m", "ipcv_export.cli", "--help"], capture_output=True, text=True)
    assert run.returncode == 0 and "examples:" in run.stdout and "exit codes" in run.stdout
    assert "(default 0.5)" in run.stdout and "in (0, 1]" in run.stdout and "--max-patches" in run.stdout
    run = subprocess.run([sys.executable, "-m", "ipcv_export.cli", "--list-models"], capture_output=True, text=True)
    assert "qwen2-vl-7b-shape" in run.stdout and "RANDOM weights" in run.stdout


def test_opset_outside_what_the_exporter_and_runtime_take_is_refused(tmp_path, capsys):
    for opset in ("17", "999"):
        assert main(["--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.onnx"), "--opset", opset]) == EXIT_USAGE
        assert f"--opset must be in [18, 23] (TensorRT 10 parses 18 to 20), got {opset}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("silent", [True, False])
def test_a_silent_stage_shows_its_name_on_a_terminal_while_it_runs(silent, monkeypatch):
    from ipcv_export.pipeline import _stage

    terminal, lines, timings = _Terminal(), [], {}
    monkeypatch.setattr(sys, "stderr", terminal)
    with _stage("lower", timings, lines.append, "(onnx)", silent=silent):
        during = terminal.getvalue()
    assert during == ("lower (onnx) ..." if silent else "")
    assert terminal.getvalue() == (during + "\r\033[K" if silent else "")  # cleared before the report line
    assert len(lines) == 1 and lines[0].startswith("lower (onnx): ") and lines[0].endswith(" s") and "lower" in timings
