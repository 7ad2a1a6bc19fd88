"""Image(s) + prompt -> generated text, with IPCV in the encoder file and IVC-Prune in the LLM.

The stock transformers model runs the LLM; its vision tower is swapped for the exported encoder
file (`EncoderFileTower`), so the embeddings the LLM reads are exactly what production would feed
it. `IvcPrune` then prunes the visual span during prefill. Every stage is timed and counted.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from .. import runtime
from ..cache import encoder_cache_file
from ..config import UsageError, check_retention
from ..tokens import kept_count
from .chat_models import ChatModel, load_chat_model
from .prune_hooks import IvcPrune


class EncoderFileTower(torch.nn.Module):
    """Stands in for the model's vision module: runs an exported encoder file. A file with DeepStack
    outputs (Qwen3-VL) hands them on as the stock tower does; `deepstack=False` leaves them out (what
    a runtime that reads only image_features, like ONNX Runtime GenAI 0.18, gives the LLM)."""

    def __init__(self, encoder: runtime.EncoderFile, width: int, deepstack: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.width = width
        self.spatial_merge_size = encoder.merge_size
        self.dtype = torch.float32
        outputs = encoder.manifest.get("outputs", [])
        self.taps = sum(o["name"].startswith("deepstack_features_") for o in outputs) if deepstack else 0

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **_) -> BaseModelOutputWithDeepstackFeatures:
        outputs = self.encoder.run_all(pixel_values.float(), grid_thw)
        embeddings = outputs[0]
        if embeddings.shape[-1] != self.width:
            raise UsageError(f"encoder file {self.encoder.path.name} gives {embeddings.shape[-1]}-wide embeddings; "
                             f"this model's LLM reads {self.width}: export the encoder from the same model")
        return BaseModelOutputWithDeepstackFeatures(last_hidden_state=embeddings, pooler_output=embeddings,
                                                    deepstack_features=list(outputs[1:1 + self.taps]))


@dataclass
class GenerationReport:
    """What one `Pipeline.generate` call produced and cost."""

    text: str
    new_token_ids: list[int]
    patches: int  # encoder input tokens (all images)
    encoder_kept: int  # tokens the encoder's pruned blocks ran on (IPCV's K; = patches at rho 1)
    visual_tokens: int  # tokens the LLM received for the images (IPCV restores all of them)
    llm_visual_kept: int  # visual tokens the LLM keeps from layer k on (only the first image is pruned)
    prompt_tokens: int  # S
    prompt_tokens_after: int  # S'
    encoder_ms: float
    prefill_ms: float  # LLM prefill, encoder excluded
    decode_tokens_per_s: float
    kv_cache_bytes: int  # after the last step

    def lines(self) -> list[str]:
        return [f"visual tokens: {self.patches} patches -> encoder blocks on {self.encoder_kept} -> "
                f"{self.visual_tokens} to the LLM -> {self.llm_visual_kept} from its pruning layer on",
                f"prompt: {self.prompt_tokens} tokens, {self.prompt_tokens_after} after pruning",
                f"encoder {self.encoder_ms:.1f} ms, prefill {self.prefill_ms:.1f} ms, "
                f"decode {self.decode_tokens_per_s:.1f} tokens/s, KV cache {self.kv_cache_bytes / 2**20:.2f} MiB"]


def _check_source(exported_from: dict, chat: ChatModel, encoder: str | Path) -> None:
    """UsageError unless the encoder file was exported from this chat model's own vision tower: the
    built-in encoder it names, or a checkpoint with the same weights. A file of another model of
    the same width would run and silently answer about other features."""
    own = chat.source.get("weights_sha256")
    same = (exported_from.get("weights_sha256") == own if own
            else exported_from.get("builtin") == chat.encoder_source)
    if not same:
        origin = exported_from.get("builtin") or exported_from.get("path") or "an unknown source"
        raise UsageError(f"encoder file {str(encoder)!r} was exported from {origin}, not from this model's vision "
                         f"tower ({chat.encoder_source})")


class Pipeline:
    """`Pipeline("tiny-qwen2-vl-chat", retention=0.5, llm_retention=0.5).generate(images, prompt)`.

    model: a built-in chat model or a checkpoint folder. encoder: an exported encoder file; when
    omitted, the model's vision tower is exported at `retention` (ONNX, verified) into a temporary
    folder that lives as long as the pipeline, or with `cache_encoder` into the tool's cache
    (`cache.encoder_cache_file`), where later pipelines of the same model and retention find it.
    A ChatModel passed in is taken over: its vision module is replaced by the encoder file.
    """

    def __init__(self, model: str | ChatModel, encoder: str | Path | None = None, retention: float = 0.5,
                 llm_retention: float = 0.5, llm_layer: int | None = None,
                 report: Callable[[str], None] = print, cache_encoder: bool = False) -> None:
        check_retention(retention)
        check_retention(llm_retention, "LLM retention")
        if encoder is not None and not Path(encoder).is_file():
            raise UsageError(f"encoder file {str(encoder)!r} does not exist")
        self.chat = model if isinstance(model, ChatModel) else load_chat_model(model)
        self.pruner = IvcPrune(self.chat.model, retention=llm_retention, layer=llm_layer)
        self._workdir = None
        if encoder is None:
            encoder = self._export_encoder(retention, report, cached=cache_encoder)
        encoder_file = runtime.load(encoder)
        if not encoder_file.manifest:
            raise UsageError(f"encoder file {str(encoder)!r} has no manifest (<file>.json) beside it: generation "
                             "takes the image preprocessing from it")
        _check_source(encoder_file.manifest.get("source", {}), self.chat, encoder)
        width = self.chat.model.config.get_text_config().hidden_size
        self.tower = EncoderFileTower(encoder_file, width)
        self.chat.model.model.visual = self.tower

    def _export_encoder(self, retention: float, report: Callable[[str], None], cached: bool) -> Path:
        """The model's encoder file at `retention`: from the cache when an earlier run left it there,
        else exported into the cache (`cached`) or into a folder that lives as long as the pipeline."""
        from ..config import Method
        from ..pipeline import export_file

        if cached:
            path = encoder_cache_file(self.chat.source, self.chat.source.get("path"), check_retention(retention))
            if path.is_file() and runtime.read_manifest(path) is not None:
                report(f"  encoder: {path} (cached by an earlier run of this model and retention)")
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            hint = (f"  the encoder file is cached for later runs of this model and retention: {path} "
                    "(--no-cache: export for this run only)")
        else:
            self._workdir = tempfile.TemporaryDirectory(prefix="ipcv-encoder-")
            path = Path(self._workdir.name) / "encoder.onnx"
            hint = (f"  the encoder was exported for this run only; export it once with `ipcv-export --model "
                    f"{self.chat.encoder_source} --retention {retention} -o encoder.onnx` and pass --encoder encoder.onnx")
        export_file(self.chat.encoder_source, path, Method(retention=retention), report=report)
        report(hint)
        return path

    @property
    def encoder_retention_e4(self) -> int:
        return check_retention(self.tower.encoder.manifest["ipcv"]["retention"])

    def preprocess(self, images) -> tuple[torch.Tensor, torch.Tensor]:
        """(pixel_values, grid_thw) of PIL images, with the processor settings the encoder file was
        exported with (the model's, including a checkpoint's preprocessor_config.json)."""
        return self.tower.encoder.preprocess(images)

    def generate(self, images, prompt: str, max_new_tokens: int = 32) -> GenerationReport:
        model = self.chat.model
        image_id = model.config.image_token_id
        if images:
            pixel_values, grid = self.preprocess(images)
            visual_inputs = {"pixel_values": pixel_values, "image_grid_thw": grid}
        else:
            grid, visual_inputs = torch.zeros(0, 3, dtype=torch.int64), {}
        input_ids = self.chat.prompt_ids(prompt, grid)
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
                  "mm_token_type_ids": (input_ids == image_id).int(), **visual_inputs}
        calls: list[tuple[float, float]] = []
        encoder_calls: list[tuple[float, float]] = []
        timer = _time_calls(model, calls) + _time_calls(model.model.visual, encoder_calls)
        try:
            with self.pruner, torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     return_dict_in_generate=True)
                record = self.pruner.last
        finally:
            for handle in timer:
                handle.remove()
        new = out.sequences[0, input_ids.shape[1]:].tolist()
        patches = int(grid.prod(-1).sum())
        visual = int((input_ids == image_id).sum())
        # transformers may run the vision tower before the first forward call or inside it
        prefill_s = _seconds([calls[0]]) - _overlap(calls[0], encoder_calls)
        decode_s = _seconds(calls[1:])
        return GenerationReport(
            text=self.chat.tokenizer.decode(new, skip_special_tokens=True), new_token_ids=new, patches=patches,
            encoder_kept=kept_count(patches, self.encoder_retention_e4), visual_tokens=visual,
            llm_visual_kept=visual - (record.visual - record.kept_visual if record else 0), prompt_tokens=input_ids.shape[1],
            prompt_tokens_after=record.sequence_after if record else input_ids.shape[1],
            encoder_ms=1e3 * _seconds(encoder_calls), prefill_ms=1e3 * prefill_s,
            decode_tokens_per_s=(len(calls) - 1) / decode_s if decode_s else 0.0,
            kv_cache_bytes=_cache_bytes(out.past_key_values))


def _time_calls(model: torch.nn.Module, intervals: list[tuple[float, float]]) -> list:
    """Hooks that append the (start, end) wall times of every forward call of `model`."""
    started: list[float] = []

    def before(module, args):
        started.append(time.perf_counter())

    def after(module, args, output):
        intervals.append((started.pop(), time.perf_counter()))

    return [model.register_forward_pre_hook(before), model.register_forward_hook(after)]


def _seconds(intervals: list[tuple[float, float]]) -> float:
    return sum(end - start for start, end in intervals)


def _overlap(call: tuple[float, float], intervals: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(call[1], end) - max(call[0], start)) for start, end in intervals)


def _cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers) if cache is not None else 0
