"""Write the byte-level tokenizer the tiny built-in chat models share (run once with the folder
ipcv_export/models/chat/byte-tokenizer; the output is committed).

The real Qwen tokenizers cannot be downloaded here, so the tiny models read text as UTF-8 bytes:
ids 0-255 are the bytes, followed by Qwen's special tokens under their real names. Built with the
`tokenizers` library (a BPE with the byte alphabet and no merges) so that it loads through
`AutoTokenizer.from_pretrained(folder)` like a checkpoint's tokenizer.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    characters = _gpt2_byte_order()
    assert set(characters) == set(pre_tokenizers.ByteLevel.alphabet())
    vocab = {character: byte for byte, character in enumerate(characters)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _gpt2_byte_order() -> list[str]:
    """The byte -> printable character map of byte-level BPE (GPT-2's convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


if __name__ == "__main__":
    for folder in sys.argv[1:]:
        byte_tokenizer().save_pretrained(Path(folder))
