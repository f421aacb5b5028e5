"""Small Hugging Face model folders made from scratch: a byte-level BPE
tokenizer trained with `tokenizers`, a chat template, and Qwen3/Llama weights.
Used by the tests, by the on-the-fly default model, and by scripts/train_tiny.py."""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from typing import Any

import torch

END_OF_TEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [END_OF_TEXT, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for m in messages %}" + IM_START + "{{ m['role'] }}\n{{ m['content'] }}" + IM_END + "\n{% endfor %}"
    "{% if add_generation_prompt %}" + IM_START + "assistant\n{% endif %}")


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (as GPT-2 and Qwen use) wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
                                   chat_template=CHAT_TEMPLATE)


def stdlib_files() -> tuple[str, list[str]]:
    """(root, relative paths of every .py file) of the running Python's standard library, sorted."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames if f.endswith(".py")]
    return root, sorted(files)


def is_heldout(relpath: str) -> bool:
    """The deterministic 2% of files kept out of training, chosen by a hash of the path
    so the choice is the same on every machine and Python version."""
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % 50 == 0


def read_text(root: str, relpath: str) -> str:
    with open(os.path.join(root, relpath), encoding="utf-8", errors="replace") as f:
        return f.read()


def stdlib_texts(limit_files: int | None = None) -> list[str]:
    root, files = stdlib_files()
    return [read_text(root, f) for f in files[:limit_files]]


def random_model(hf_config: Any, seed: int = 0) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(hf_config)


def save_model_folder(folder: str, model: Any, tokenizer: Any, sampling: dict | None = None) -> None:
    """Write config, weights, tokenizer and a generation config whose EOS ids are
    the end-of-turn and end-of-text tokens, with recommended `sampling` settings."""
    from transformers import GenerationConfig

    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT)]
    extra = {"do_sample": True, **sampling} if sampling else {}
    GenerationConfig(eos_token_id=eos, bos_token_id=eos[1], **extra).save_pretrained(folder)
