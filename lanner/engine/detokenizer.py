"""Incremental detokenization and stop strings.

Decoding a growing token list from scratch every step is quadratic; decoding
only the new token is wrong for tokenizers whose pieces depend on their
neighbours (leading spaces, multi-byte characters split over tokens). So each
step decodes a short window: the tokens already shown plus the new ones, and
emits the difference, holding back text that ends in an incomplete character.
A fast tokenizer does this in Rust (`tokenizers`' DecodeStream, about a
microsecond a token against several through transformers' decode: the engine
does it for every token of every request, between its steps).
"""
from __future__ import annotations

import json
from typing import Any

from tokenizers.decoders import DecodeStream

from lanner.core.request import Request

_CONTEXT_TOKENS = 6  # prompt tokens decoded along with the first outputs, for spacing
_CLEANUP_PROBE = "a . b , c ! d ? e 's f n't g 'm h 've i 're"  # what clean_up_tokenization_spaces rewrites


def stream_decoder(tokenizer: Any) -> Any | None:
    """The `tokenizers` Tokenizer behind `tokenizer` if decoding with it gives exactly
    `tokenizer.decode`'s text, else None: a slow tokenizer, or one whose decode cleans up the
    spaces before punctuation afterwards (transformers does for some WordPiece tokenizers)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    ids = tokenizer.encode(_CLEANUP_PROBE, add_special_tokens=False)
    return backend if tokenizer.decode(ids) == backend.decode(ids, skip_special_tokens=False) else None


class Detokenizer:
    """One sample's text as its tokens arrive. With `backend` (stream_decoder's) it streams through
    DecodeStream, primed with the prompt's last tokens; where that cannot give the window's text
    (the prompt ends inside a character, or the stream rejects a token sequence, as it does for some
    byte-fallback sequences no model writes) it continues with the window in Python, from the last
    text the stream gave (over invalid UTF-8 the switch can differ from the window alone by a U+FFFD)."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], skip_special_tokens: bool,
                 backend: Any | None = None):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.backend = backend
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens) if backend is not None else None
        if self.stream is not None and self.tokens and self.stream.step(backend, self.tokens) is None \
                and backend.decode(self.tokens, skip_special_tokens=skip_special_tokens).endswith("\ufffd"):
            self.stream = None  # the prompt ends inside a character: its completion is not output text

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (may be empty)."""
        self.tokens.append(token_id)
        if self.stream is not None:
            try:
                text = self.stream.step(self.backend, token_id)
            except Exception:  # tokenizers raises a bare Exception ("Invalid prefix encountered")
                self.stream = None
                self.prefix_offset = max(self.read_offset - _CONTEXT_TOKENS, 0)
            else:
                if text is None:
                    return ""
                self.read_offset = len(self.tokens)
                return text
        shown = self.decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self.decode(self.tokens[self.prefix_offset:])
        if len(full) <= len(shown) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        return full[len(shown):]


def find_stop_string(req: Request, new_text_len: int) -> str | None:
    """If the text that just grew by `new_text_len` characters now contains a stop
    string, truncate the text there and return that string."""
    text = req.output_text
    longest = max(len(s) for s in req.params.stop)
    search_from = max(0, len(text) - new_text_len - longest + 1)
    best = None
    for stop in req.params.stop:
        idx = text.find(stop, search_from)
        if idx != -1 and (best is None or idx < best[0]):
            best = (idx, stop)
    if best is None:
        return None
    idx, stop = best
    req.output_text = text[:idx + len(stop)] if req.params.include_stop_str_in_output else text[:idx]
    return stop


def visible_length(req: Request) -> int:
    """How much of the text is safe to show now: while running, the tail that may still become
    a stop string is held back, so a streaming client never sees part of one."""
    if req.finished or not req.params.stop:
        return len(req.output_text)
    hold = max(len(s) for s in req.params.stop) - 1
    return max(len(req.output_text) - hold, 0)


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen) spell each byte as one printable
    character: printable Latin-1 bytes as themselves, the other 68 as chr(256 + i) in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


class TokenBytes:
    """The raw bytes of one token (OpenAI logprobs' `bytes`): for a token that is part of a
    multi-byte character, decoding gives U+FFFD, but its bytes are what a client must join.
    `text(token_id)` is the token decoded alone with its bytes, kept per token id once made (the
    vocabulary bounds them): logprobs name the same tokens again and again, and making one costs
    microseconds through transformers, for every top token of every row of every step."""

    def __init__(self, tokenizer: Any, backend: Any | None = None):
        self.tokenizer = tokenizer
        self.decode = (backend or tokenizer).decode  # backend: stream_decoder's, the same text
        self.kind = self._decoder_kind(tokenizer)
        self.alphabet = _byte_level_alphabet() if self.kind == "ByteLevel" else {}
        self.texts: dict[int, tuple[str, bytes]] = {}

    def text(self, token_id: int) -> tuple[str, bytes]:
        made = self.texts.get(token_id)
        if made is None:
            made = self.texts[token_id] = (self.decode([token_id], skip_special_tokens=False), self(token_id))
        return made

    @staticmethod
    def _decoder_kind(tokenizer: Any) -> str | None:
        try:
            decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
        except Exception:  # a tokenizer without a `tokenizers` backend
            return None
        kinds = {d.get("type") for d in decoder.get("decoders", [])} | {decoder.get("type")}
        return "ByteLevel" if "ByteLevel" in kinds else "ByteFallback" if "ByteFallback" in kinds else None

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.kind == "ByteLevel" and piece and all(ch in self.alphabet for ch in piece):
            return bytes(self.alphabet[ch] for ch in piece)
        if self.kind == "ByteFallback" and piece:
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                return bytes([int(piece[3:5], 16)])
            return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([token_id]).encode()  # added/special tokens, other tokenizers
