"""The model lanner runs when none is named.

Until the trained lanner-tiny ships inside the package, this is a small Qwen3
with RANDOM weights and a BPE tokenizer trained on the Python standard library,
built on first use into ~/.cache/lanner (about ten seconds, offline). It makes
the commands work end to end; its text is gibberish.
"""
from __future__ import annotations

import os

_PACKAGED = os.path.join(os.path.dirname(__file__), "assets", "lanner-tiny")


def default_model_path() -> str:
    if os.path.isfile(os.path.join(_PACKAGED, "config.json")):
        return _PACKAGED
    folder = os.path.join(os.environ.get("LANNER_CACHE", os.path.expanduser("~/.cache/lanner")), "random-tiny")
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        _build_random_tiny(folder)
    return folder


def _build_random_tiny(folder: str) -> None:
    from transformers import Qwen3Config

    from lanner.models.tiny import IM_END, random_model, save_model_folder, stdlib_texts, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(stdlib_texts(limit_files=300), vocab_size=4096)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END))
    config.architectures = ["Qwen3ForCausalLM"]
    tmp = folder + f".tmp{os.getpid()}"
    save_model_folder(tmp, random_model(config), tokenizer)
    os.replace(tmp, folder)
