"""Incremental detokenization: the Rust stream (tokenizers' DecodeStream) gives the window's text,
token for token, and falls back to the window wherever it cannot."""
from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lanner import LLM
from lanner.core.request import SamplingParams
from lanner.default_model import default_model_path
from lanner.engine.detokenizer import Detokenizer, stream_decoder

TEXTS = ["def main():\n    return x + 1\n", "héllo wörld, ça va?", "日本語のテキスト", "emoji 🙂 and more 🚀",
         "  leading spaces,\ttabs\tand\n\nnewlines", "the quick brown fox"]


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-2-style tokenizer: "▁" for spaces, raw bytes for what the vocabulary lacks, and a
    decoder that strips the first space (so a token's text depends on what comes before it)."""
    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tk.train_from_iterator(TEXTS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=specials))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_tokenizer():
    return AutoTokenizer.from_pretrained(default_model_path())


def streamed(tokenizer, prompt: list[int], out: list[int], skip: bool, fast: bool) -> tuple[str, Detokenizer]:
    detok = Detokenizer(tokenizer, prompt, skip, stream_decoder(tokenizer) if fast else None)
    return "".join(detok.push(t) for t in out), detok


@pytest.mark.parametrize("make", [tiny_tokenizer, byte_fallback_tokenizer])
@pytest.mark.parametrize("skip", [True, False])
def test_the_stream_gives_the_windows_text_and_the_whole_decode(make, skip):
    tok = make()
    assert stream_decoder(tok) is not None
    rng = random.Random(0)
    for trial in range(200):
        prompt = tok.encode(rng.choice(TEXTS), add_special_tokens=False)
        text = "".join(rng.choice(TEXTS + [" ", "x", tok.eos_token]) for _ in range(4))
        out = tok.encode(text, add_special_tokens=False)
        fast, detok = streamed(tok, prompt, out, skip, fast=True)
        assert detok.stream is not None, trial  # no fallback on text a tokenizer writes
        assert fast == streamed(tok, prompt, out, skip, fast=False)[0]
        assert prompt and tok.decode(prompt + out, skip_special_tokens=skip) \
            == tok.decode(prompt, skip_special_tokens=skip) + fast, (trial, text)


def test_a_prompt_ending_inside_a_character_falls_back_to_the_window():
    tok = tiny_tokenizer()
    ids = tok.encode("ab 🙂🙂", add_special_tokens=False)
    for cut in range(1, len(ids)):
        prompt, out = ids[:cut], ids[cut:]
        fast, detok = streamed(tok, prompt, out, True, fast=True)
        assert fast == streamed(tok, prompt, out, True, fast=False)[0]
        assert (detok.stream is None) == tok.decode(prompt).endswith("\ufffd")


def test_sequences_the_stream_rejects_continue_in_the_window():
    """DecodeStream raises "Invalid prefix" when a token rewrites text it already returned (byte
    fallback over invalid UTF-8 does): the request's text goes on, from the window."""
    tok = byte_fallback_tokenizer()
    rng = random.Random(1)
    rejected = 0
    for _ in range(300):
        prompt = tok.encode(rng.choice(TEXTS), add_special_tokens=False)
        out = [rng.randrange(len(tok)) for _ in range(30)]
        text, detok = streamed(tok, prompt, out, False, fast=True)
        assert isinstance(text, str)
        rejected += detok.stream is None
    assert rejected > 10


def test_a_tokenizer_whose_decode_cleans_up_spaces_keeps_the_window():
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", ".", ",", "!", "?", "'", "s", "n", "t", "m", "ve",
                                         "re", "c", "d", "e", "f", "g", "h", "i"])}
    tk = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.BertPreTokenizer(), decoders.WordPiece()
    cleaning = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", clean_up_tokenization_spaces=True)
    assert cleaning.decode(cleaning.encode("a . b")) == "a. b"
    assert stream_decoder(cleaning) is None
    plain = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", clean_up_tokenization_spaces=False)
    assert stream_decoder(plain) is not None


def test_the_engine_streams_with_the_rust_decoder_and_its_text_is_the_whole_decode():
    llm = LLM(max_num_seqs=4)
    engine = llm.engine
    assert engine.stream_decoder is not None
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    out = llm.generate(["def add(a, b):", "日本語"], params, use_tqdm=False)
    for o in out:
        c = o.outputs[0]
        # a character the last tokens leave incomplete is held back, as while streaming
        assert c.text == engine.tokenizer.decode(c.token_ids, skip_special_tokens=True).rstrip("\ufffd")
        for token, entry in zip(c.token_ids, c.logprobs):
            assert entry[token].decoded_token == engine.tokenizer.decode([token])
