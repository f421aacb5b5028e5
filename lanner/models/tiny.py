"""Small Hugging Face model folders made from scratch: a byte-level BPE
tokenizer trained with `tokenizers`, a chat template, and Qwen3/Llama weights.
Used by the tests, by the on-the-fly default model, and by scripts/train_tiny.py."""
from __future__ import annotations

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


def stdlib_texts(limit_files: int | None = None) -> list[str]:
    """Source text of the running Python's standard library, in a fixed order."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py")]
    texts = []
    for path in files[:limit_files]:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return texts


def save_model_folder(folder: str, hf_config: Any, tokenizer: Any, state_dict: dict | None = None,
                      seed: int = 0) -> None:
    """Write config, weights (random if no state_dict), tokenizer and generation config."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    eos = [tokenizer.convert_tokens_to_ids(t) for t in (IM_END, END_OF_TEXT)]
    GenerationConfig(eos_token_id=eos, bos_token_id=eos[1]).save_pretrained(folder)
