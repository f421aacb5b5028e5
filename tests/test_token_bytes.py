"""Raw token bytes for OpenAI logprobs: a token that is part of a multi-byte character decodes
to U+FFFD, but its bytes, joined with its neighbours', must give the text's UTF-8."""
from __future__ import annotations

from tokenizers import Tokenizer, decoders, models
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lanner import LLM, SamplingParams
from lanner.default_model import default_model_path
from lanner.engine.detokenizer import TokenBytes

TEXT = "héllo wörld ✓ 日本語"


def test_byte_level_tokens_join_to_utf8():
    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    token_bytes = TokenBytes(tokenizer)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert token_bytes.kind == "ByteLevel"
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the case that needs raw bytes
    assert b"".join(token_bytes(i) for i in ids) == TEXT.encode()


def test_byte_fallback_tokens_join_to_utf8():
    # a SentencePiece-style vocabulary: '▁' for spaces, <0xNN> pieces for bytes it lacks
    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}, "▁h": 257, "llo": 258, "▁w": 259}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    token_bytes = TokenBytes(tokenizer)
    ids = [257, 1 + 0xC3, 1 + 0xA9, 258, 259, 1 + 0xE2, 1 + 0x9C, 1 + 0x93]  # "▁h" é "llo" "▁w" ✓
    assert token_bytes.kind == "ByteFallback"
    assert b"".join(token_bytes(i) for i in ids) == " héllo w✓".encode()


def test_prompt_logprobs_carry_token_bytes():
    llm = LLM(device="cpu", dtype="float32", num_kv_blocks=64)
    ids = llm.get_tokenizer().encode(TEXT, add_special_tokens=False)
    out = llm.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    entries = out.prompt_logprobs[1:]  # the first prompt token has no logprob
    assert b"".join(entry[tid].token_bytes for tid, entry in zip(ids[1:], entries)) == TEXT.encode()[
        len(llm.engine.token_bytes(ids[0])):]


def test_a_tokens_text_and_bytes_are_made_once():
    """Logprobs name the same tokens step after step: each id is decoded once, with the
    tokenizer's text whether or not the Rust backend decodes it."""
    from lanner.engine.detokenizer import stream_decoder

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    ids = tokenizer.encode(TEXT, add_special_tokens=False) + [tokenizer.eos_token_id]
    for backend in (None, stream_decoder(tokenizer)):
        texts = TokenBytes(tokenizer, backend)
        made = [texts.text(i) for i in ids]
        assert made == [(tokenizer.decode([i]), texts(i)) for i in ids]
        texts.decode = None  # a second call must not decode again
        assert [texts.text(i) for i in ids] == made
