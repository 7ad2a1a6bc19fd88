"""Where the tool keeps what it makes once and reuses: converted weights (`make dinov2-small`) and
the encoder files `ipcv-export generate` exports, keyed by what they were made from."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SETTINGS_FILES = ("config.json", "preprocessor_config.json")
"""A checkpoint folder's files besides its weights that shape an exported encoder file (the tower's
config and the image processor settings the manifest records)."""


def cache_root() -> Path:
    """$IPCV_EXPORT_CACHE, else ~/.cache/ipcv-export."""
    return Path(os.environ.get("IPCV_EXPORT_CACHE") or Path.home() / ".cache" / "ipcv-export")


def encoder_cache_file(source: dict, folder: str | None, retention_e4: int) -> Path:
    """The cached encoder file for a model `source` (a built-in's name and seed, or a checkpoint's
    weights hash) exported at `retention_e4` by this tool's code: any change of weights, settings
    files, retention or of the tool itself gives another file, so a stale one is never used."""
    settings = {}
    if folder is not None:
        for name in SETTINGS_FILES:
            path = Path(folder) / name
            if path.is_file():
                settings[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    key = json.dumps({"tool": tool_fingerprint(), "source": source, "settings": settings, "retention_e4": retention_e4},
                     sort_keys=True)
    return cache_root() / "encoders" / hashlib.sha256(key.encode()).hexdigest()[:20] / "encoder.onnx"


def tool_fingerprint() -> str:
    """sha256 of the package's own code and data files: the export's behaviour, also between
    releases (a checkout's edits change it too). About a hundred small files: milliseconds."""
    package = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.suffix in (".py", ".json") and path.is_file():
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
