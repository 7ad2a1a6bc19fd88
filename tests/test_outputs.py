"""Nothing half-written, mixed or left behind: the output lock, staging folders, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from ipcv_export import outputs
from ipcv_export.cli import EXIT_FAILED, EXIT_TERMINATED, EXIT_USAGE, main
from ipcv_export.config import UsageError
from ipcv_export.lower import tensorrt


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_lock_refuses_a_second_export_and_a_dead_one_is_taken_over(tmp_path):
    output = tmp_path / "encoder.onnx"
    with outputs.locked(output):
        assert (tmp_path / "encoder.onnx.lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UsageError, match=f"another export \\(process {os.getpid()}\\) is writing"):
            with outputs.locked(output):
                pass
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "encoder.onnx.lock").write_text(f"{_dead_pid()}\n")
    with outputs.locked(output):
        assert (tmp_path / "encoder.onnx.lock").read_text().strip() == str(os.getpid())
    assert list(tmp_path.iterdir()) == []


def test_a_fresh_lock_without_an_id_counts_as_held(tmp_path):
    (tmp_path / "e.onnx.lock").write_text("")
    with pytest.raises(UsageError, match="another export"):
        with outputs.locked(tmp_path / "e.onnx"):
            pass


def test_staging_removes_the_folders_of_dead_processes_only(tmp_path):
    stale = tmp_path / f"{outputs.STAGING_PREFIX}{_dead_pid()}-abc"
    live = tmp_path / f"{outputs.STAGING_PREFIX}{os.getppid()}-def"
    for folder in (stale, live):
        folder.mkdir()
        (folder / "half.onnx").write_bytes(b"x")
    with outputs.staging(tmp_path) as staging:
        assert staging.name.startswith(f"{outputs.STAGING_PREFIX}{os.getpid()}-")
        assert not stale.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]


def test_a_manifest_path_that_is_a_folder_is_refused_before_any_work(tmp_path, capsys):
    (tmp_path / "e.pt2.json").mkdir()
    assert main(["--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.pt2")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "e.pt2.json is a folder" in err and err.count("\n") == 1
    assert [p.name for p in tmp_path.iterdir()] == ["e.pt2.json"]


def test_an_engine_without_tensorrt_never_overwrites_an_existing_onnx_file(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tensorrt, "tensorrt_available", lambda: False)
    for existing in ("e.onnx", "e.onnx.json"):
        (tmp_path / existing).write_text("the user's own file")
        assert main(["--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.engine")]) == EXIT_USAGE
        assert "would write the checked ONNX file" in capsys.readouterr().err
        assert [p.name for p in tmp_path.iterdir()] == [existing]
        assert (tmp_path / existing).read_text() == "the user's own file"
        (tmp_path / existing).unlink()


def test_sigterm_during_an_export_ends_in_one_line_and_leaves_nothing(tmp_path):
    """A subprocess export, terminated once its staging folder exists (lowering): rc 143, one
    line on stderr, the output folder as empty as before."""
    command = [sys.executable, "-m", "ipcv_export.cli", "--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.onnx")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(tmp_path.glob(f"{outputs.STAGING_PREFIX}*")) and process.poll() is None:
        assert time.monotonic() < deadline, "the export never reached its staging folder"
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == EXIT_TERMINATED
    assert err.strip().splitlines()[-1] == "ipcv-export: error: terminated, nothing written"
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_files_is_refused_up_front(capsys):
    """/proc accepts os.access(W_OK) from root but no new file: the probe creates one for real."""
    assert main(["--model", "tiny-qwen2-vl", "-o", "/proc/encoder.onnx"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "output folder /proc is not writable" in err and err.count("\n") == 1


def test_a_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    from ipcv_export import api

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / ".ipcv-export-1-x" / "e.onnx"))

    monkeypatch.setattr(api, "export", full)
    assert main(["--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.onnx")]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("ipcv-export: error: No space left on device: ") and err.count("\n") == 1


def test_a_second_export_to_the_same_name_is_refused_while_the_first_runs(tmp_path):
    """Two processes, one output name: the second gets one line and rc 2 and writes nothing; the
    first is then terminated, leaving the folder empty."""
    command = [sys.executable, "-m", "ipcv_export.cli", "--model", "tiny-qwen2-vl", "-o", str(tmp_path / "e.onnx")]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (tmp_path / "e.onnx.lock").exists():
        assert first.poll() is None and time.monotonic() < deadline, "the first export never took its lock"
        time.sleep(0.1)
    second = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert second.returncode == EXIT_USAGE
    assert second.stderr.strip().splitlines()[-1].startswith(f"ipcv-export: error: another export (process {first.pid})")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == EXIT_TERMINATED
    assert list(tmp_path.iterdir()) == []


def test_a_signal_as_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """SIGTERM arriving just after the staging folder exists (the window the subprocess test above
    can hit on a loaded machine) still removes it, also with another thread alive to take the signal
    (as torch's are in a real export)."""
    class Stop(Exception):
        pass

    def stop(_signum, _frame):
        raise Stop

    made = os.mkdir

    def mkdir_then_signal(*args, **kwargs):
        made(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # the handler runs by the time this returns, whichever thread took the signal

    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)
    bystander.start()
    previous = signal.signal(signal.SIGTERM, stop)
    monkeypatch.setattr(os, "mkdir", mkdir_then_signal)
    try:
        with pytest.raises(Stop):
            with outputs.staging(tmp_path):
                pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        idle.set()
    assert list(tmp_path.iterdir()) == []
