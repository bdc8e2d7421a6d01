"""Text in and out of a model: its bytes (byte-level models, the default corpus's), or
the tokenizer it was trained with.

`encode(text) -> ids`; `streamer()` turns the ids of a continuation, pushed as they are
generated, into text as soon as it is complete: a byte-level model's UTF-8 is decoded
incrementally (a character split across tokens waits for its last byte; invalid bytes
become U+FFFD), a tokenizer's continuation is decoded with the prompt before it (so a
word's leading space survives) and held back while it ends in an unfinished character.
"""

from __future__ import annotations

import codecs
from typing import Any, Sequence

REPLACEMENT = "\ufffd"
BYTES = 256


class ByteCodec:
    """UTF-8 bytes as token ids 0..255; an id past 255 (a model whose vocabulary is larger
    than its data's) is written as U+FFFD."""

    byte_level = True
    name = "bytes"

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        streamer = self.streamer([])
        return streamer.push(ids) + streamer.finish()

    def streamer(self, prompt_ids: Sequence[int]) -> "ByteStreamer":
        return ByteStreamer()


class ByteStreamer:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, ids: Sequence[int]) -> str:
        out = []
        for i in ids:
            if 0 <= i < BYTES:
                out.append(self._decoder.decode(bytes((i,))))
            else:
                out.append(self._decoder.decode(b"", final=True) + REPLACEMENT)
                self._decoder.reset()
        return "".join(out)

    def finish(self) -> str:
        return self._decoder.decode(b"", final=True)


class TokenizerCodec:
    """A transformers tokenizer. `add_special_tokens`: whether a prompt gets the tokenizer's
    own special tokens (a Hugging Face model's convention; our training reads text without them)."""

    byte_level = False

    def __init__(self, tokenizer: Any, folder: str, add_special_tokens: bool = False):
        self.tokenizer, self.folder, self.add_special_tokens = tokenizer, folder, add_special_tokens
        self.name = f"tokenizer {folder}"

    def __len__(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """The ids of `text`; `add_special_tokens` None: the codec's convention (a prompt's)."""
        special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def streamer(self, prompt_ids: Sequence[int]) -> "TokenizerStreamer":
        return TokenizerStreamer(self, prompt_ids)


class TokenizerStreamer:
    def __init__(self, codec: TokenizerCodec, prompt_ids: Sequence[int]):
        self.codec, self.prompt = codec, list(prompt_ids)
        self.base = codec.decode(self.prompt)
        self.ids: list[int] = []
        self.written = 0

    def _text(self) -> str:
        full = self.codec.decode(self.prompt + self.ids)
        return full[len(self.base):] if full.startswith(self.base) else self.codec.decode(self.ids)

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(i) for i in ids)
        text = self._text()
        if text.endswith(REPLACEMENT):  # an unfinished character: wait for the rest of it
            return ""
        new, self.written = text[self.written:], max(self.written, len(text))
        return new

    def finish(self) -> str:
        text = self._text()
        new, self.written = text[self.written:], max(self.written, len(text))
        return new


__all__ = ["ByteCodec", "TokenizerCodec", "BYTES"]
