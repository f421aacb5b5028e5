"""Tiny random Hugging Face models, saved as real model folders with a BPE
tokenizer, that every test compares lanner against."""
from __future__ import annotations

import json
import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from lanner.models.tiny import random_model, save_model_folder, stdlib_texts, train_bpe_tokenizer

torch.set_num_threads(2)

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.05)


@pytest.fixture(scope="session")
def tokenizer():
    return train_bpe_tokenizer(stdlib_texts(limit_files=40), vocab_size=512)


def _save(tmp_path_factory, tokenizer, name: str, config) -> str:
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.eos_token_id = tokenizer.eos_token_id
    folder = str(tmp_path_factory.mktemp(name))
    save_model_folder(folder, random_model(config), tokenizer)
    return folder


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory, tokenizer):
    from transformers import Qwen3Config

    return _save(tmp_path_factory, tokenizer, "qwen3", Qwen3Config(
        vocab_size=len(tokenizer), head_dim=32, tie_word_embeddings=False, **COMMON))


@pytest.fixture(scope="session")
def qwen3_tied_path(tmp_path_factory, tokenizer):
    from transformers import Qwen3Config

    return _save(tmp_path_factory, tokenizer, "qwen3tied", Qwen3Config(
        vocab_size=len(tokenizer), head_dim=16, tie_word_embeddings=True, **COMMON))


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    return _save(tmp_path_factory, tokenizer, "llama", LlamaConfig(
        vocab_size=len(tokenizer), rope_scaling=scaling, rope_theta=10000.0, tie_word_embeddings=False, **COMMON))


@pytest.fixture(scope="session")
def qwen3_moe_path(tmp_path_factory, tokenizer):
    """Layer 0 dense (mlp_only_layers), layers 1 and 2 sparse: 8 experts, top 2, renormalised."""
    from transformers import Qwen3MoeConfig

    return _save(tmp_path_factory, tokenizer, "qwen3moe", Qwen3MoeConfig(
        vocab_size=len(tokenizer), head_dim=16, tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=True, **COMMON))


@pytest.fixture(scope="session")
def heads(tmp_path_factory) -> dict[str, str]:
    """Each model proposer's folder for lanner-tiny: the trained draft model, and random heads (the
    trained ones are tested on the GPU and in the model card): EAGLE-3 with a shuffled pruned
    vocabulary, and an MTP layer."""
    from lanner.default_model import DEFAULT_MODEL, DRAFT_MODEL
    from lanner.models import tiny

    root = tmp_path_factory.mktemp("heads")
    with open(os.path.join(DEFAULT_MODEL, "config.json")) as f:
        target = json.load(f)
    cfg = tiny.eagle3_config(target, 2048, 256)
    counts = torch.randperm(target["vocab_size"], generator=torch.Generator().manual_seed(1))
    d2t, t2d = tiny.pruned_vocab(counts, 2048)
    mcfg = tiny.mtp_config(target)
    return {"eagle3": tiny.random_head(str(root / "eagle3"), cfg, tiny.eagle3_shapes(cfg), 1, {"d2t": d2t, "t2d": t2d}),
            "mtp": tiny.random_head(str(root / "mtp"), mcfg, tiny.mtp_shapes(mcfg), 2), "draft_model": DRAFT_MODEL}


@pytest.fixture(params=["qwen3", "qwen3_tied", "llama", "qwen3_moe"])
def model_path(request):
    return request.getfixturevalue(f"{request.param}_path")


@pytest.fixture
def kv_scaled_model(tmp_path) -> tuple[str, int]:
    """The embedded model with per-layer fp8 KV-cache scales in its checkpoint (k_scale 0.5, v_scale
    4.0, as calibrated fp8-KV checkpoints carry them): (its folder, its layer count)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from lanner.default_model import default_model_path

    src = default_model_path()
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    layers = sum(name.endswith("self_attn.o_proj.weight") for name in weights)
    for i in range(layers):
        # llm-compressor writes shape [1], others a scalar
        weights[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([0.5])
        weights[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(4.0)
    save_file(weights, tmp_path / "model.safetensors")
    return str(tmp_path), layers


def make_llm(path: str, **kwargs):
    from lanner import LLM

    return LLM(model=path, device="cpu", dtype="float32", **{"num_kv_blocks": 256, **kwargs})


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for ids in prompts:
            seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0, repetition_penalty=1.0)
            outs.append(seq[0, len(ids):].tolist())
    return outs


def random_prompts(n: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for length in lengths]
