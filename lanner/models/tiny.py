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


def python_files() -> list[tuple[str, str]]:
    """(root, relative path) of every .py file of the running Python installation: the standard
    library and every site-packages/dist-packages folder, each file once, sorted."""
    import site
    import sysconfig

    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    seen_roots, seen_files, out = set(), set(), []
    for root in roots:
        real = os.path.realpath(root)
        if real in seen_roots or not os.path.isdir(real):
            continue
        seen_roots.add(real)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__"
                                 and not (root == paths["stdlib"] and d in ("site-packages", "dist-packages")))
            for f in filenames:
                full = os.path.realpath(os.path.join(dirpath, f))
                if f.endswith(".py") and full not in seen_files and os.path.isfile(full):
                    seen_files.add(full)
                    out.append((root, os.path.relpath(os.path.join(dirpath, f), root)))
    return sorted(out)


def corpus_name(root: str, relpath: str) -> str:
    """A file's name in the corpus, the same on every machine: which kind of root, then the path."""
    return f"{'site' if 'packages' in root else 'stdlib'}/{relpath}"


def heldout_code(num: int, min_chars: int = 2000) -> list[str]:
    """The text of `num` held-out files of this Python installation (in name order), for
    measuring the shipped models and proposers on code they were not trained on."""
    picked = []
    for root, rel in python_files():
        if is_heldout(corpus_name(root, rel)):
            text = read_text(root, rel)
            if len(text) >= min_chars:
                picked.append(text)
                if len(picked) == num:
                    break
    return picked


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


# ---- speculative heads for a target (EAGLE-3 and MTP layouts; lanner/models/eagle3.py, mtp.py) ----

def _layer_shapes(prefix: str, hidden: int, input_size: int, heads: int, kv_heads: int, head_dim: int,
                  intermediate: int, qk_norm: bool) -> dict[str, tuple[int, ...]]:
    shapes = {f"{prefix}input_layernorm.weight": (hidden,), f"{prefix}post_attention_layernorm.weight": (hidden,),
              f"{prefix}self_attn.q_proj.weight": (heads * head_dim, input_size),
              f"{prefix}self_attn.k_proj.weight": (kv_heads * head_dim, input_size),
              f"{prefix}self_attn.v_proj.weight": (kv_heads * head_dim, input_size),
              f"{prefix}self_attn.o_proj.weight": (hidden, heads * head_dim),
              f"{prefix}mlp.gate_proj.weight": (intermediate, hidden), f"{prefix}mlp.up_proj.weight": (intermediate, hidden),
              f"{prefix}mlp.down_proj.weight": (hidden, intermediate)}
    if qk_norm:
        shapes |= {f"{prefix}self_attn.q_norm.weight": (head_dim,), f"{prefix}self_attn.k_norm.weight": (head_dim,)}
    return shapes


def eagle3_config(target: dict, draft_vocab_size: int, intermediate_size: int | None = None) -> dict:
    """An EAGLE-3 head's config.json for a target config (one Llama layer of the target's width)."""
    layers = target["num_hidden_layers"]
    keys = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "max_position_embeddings", "vocab_size")
    return {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", **{k: target[k] for k in keys},
            "intermediate_size": intermediate_size or target["intermediate_size"], "num_hidden_layers": 1,
            "rope_theta": (target.get("rope_parameters") or {}).get("rope_theta", target.get("rope_theta", 10000.0)),
            "target_hidden_size": target["hidden_size"], "draft_vocab_size": draft_vocab_size,
            "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": [2, layers // 2, layers - 3]}}


def eagle3_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, d = cfg["hidden_size"], cfg["head_dim"]
    return {"fc.weight": (h, 3 * cfg["target_hidden_size"]), "midlayer.hidden_norm.weight": (h,),
            "norm.weight": (h,), "lm_head.weight": (cfg["draft_vocab_size"], h),
            **_layer_shapes("midlayer.", h, 2 * h, cfg["num_attention_heads"], cfg["num_key_value_heads"], d,
                            cfg["intermediate_size"], False)}


def mtp_config(target: dict) -> dict:
    return {**target, "num_nextn_predict_layers": 1}


def mtp_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """DeepSeek-V3's names: the layer after the target's, `model.layers.{num_hidden_layers}.`."""
    h, p = cfg["hidden_size"], f"model.layers.{cfg['num_hidden_layers']}."
    return {f"{p}enorm.weight": (h,), f"{p}hnorm.weight": (h,), f"{p}eh_proj.weight": (h, 2 * h),
            f"{p}shared_head.norm.weight": (h,),
            **_layer_shapes(p, h, h, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"],
                            cfg["intermediate_size"], cfg.get("model_type") == "qwen3")}


def pruned_vocab(token_counts: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EAGLE-3's d2t and t2d for the `size` most frequent target tokens (in id order)."""
    keep = torch.topk(token_counts.float(), size).indices.sort().values
    t2d = torch.zeros(len(token_counts), dtype=torch.bool)
    t2d[keep] = True
    return keep - torch.arange(size), t2d


def save_head(folder: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    import json

    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"))


def random_head(folder: str, config: dict, shapes: dict[str, tuple[int, ...]], seed: int = 0,
                extra: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> str:
    """A head with random weights (norms 1) under the checkpoint names of `shapes`."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {name: torch.ones(shape, dtype=dtype) if "norm" in name else
               (torch.randn(shape, generator=gen) * 0.05).to(dtype) for name, shape in shapes.items()}
    save_head(folder, config, {**tensors, **(extra or {})})
    return folder


# ---- the heads in plain torch over whole sequences: training, and the tests' reference ----------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device).float() / d)
    freqs = positions.float()[..., None] * inv
    cos, sin = torch.cat([freqs, freqs], -1).cos()[..., None, :], torch.cat([freqs, freqs], -1).sin()[..., None, :]
    half = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return (x.float() * cos + half.float() * sin).to(x.dtype)


def unrolled_mask(n: int, steps: int, device) -> torch.Tensor:
    """[steps*n, steps*n] attention mask of a head unrolled over `steps` draft steps (EAGLE-3's
    training-time test): step s at row i stands for the draft's s-th token after position i; it
    sees step 1 at rows <= i (the context, from the target's states) and steps 2..s at row i."""
    i = torch.arange(n, device=device)
    causal, diag = i[None, :] <= i[:, None], i[None, :] == i[:, None]
    mask = torch.zeros(steps * n, steps * n, dtype=torch.bool, device=device)
    for s in range(steps):
        mask[s * n:(s + 1) * n, :n] = causal
        for t in range(1, s + 1):
            mask[s * n:(s + 1) * n, t * n:(t + 1) * n] = diag
    return mask


def _attend(p: dict, pre: str, cfg: dict, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
            qk_norm: bool) -> torch.Tensor:
    """x [B, S*N, in] (all unrolled steps side by side) -> attention output after o_proj."""
    B, L, _ = x.shape
    h, kvh, d = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    theta = cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    q = (x @ p[pre + "self_attn.q_proj.weight"].t()).view(B, L, h, d)
    k = (x @ p[pre + "self_attn.k_proj.weight"].t()).view(B, L, kvh, d)
    v = (x @ p[pre + "self_attn.v_proj.weight"].t()).view(B, L, kvh, d)
    if qk_norm:
        q, k = _rms(q, p[pre + "self_attn.q_norm.weight"], cfg["rms_norm_eps"]), \
            _rms(k, p[pre + "self_attn.k_norm.weight"], cfg["rms_norm_eps"])
    q, k = _rotate(q, positions, theta), _rotate(k, positions, theta)
    k, v = k.repeat_interleave(h // kvh, dim=2), v.repeat_interleave(h // kvh, dim=2)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           attn_mask=mask)
    return out.transpose(1, 2).reshape(B, L, h * d) @ p[pre + "self_attn.o_proj.weight"].t()


def _mlp(p: dict, pre: str, x: torch.Tensor) -> torch.Tensor:
    gate, up = x @ p[pre + "mlp.gate_proj.weight"].t(), x @ p[pre + "mlp.up_proj.weight"].t()
    return (torch.nn.functional.silu(gate) * up) @ p[pre + "mlp.down_proj.weight"].t()


def unrolled_head(kind: str, p: dict, cfg: dict, embed: torch.Tensor, tokens: list[torch.Tensor],
                  hidden: torch.Tensor) -> list[torch.Tensor]:
    """A head ("eagle3" or "mtp") over whole sequences, unrolled over len(tokens) draft steps.
    tokens[s]: [B, N] the token step s reads at each row (step 0: the token after the row's
    position); hidden: [B, N, ...] the target's states (EAGLE-3: three layers' inputs side by
    side; MTP: its final normed state). Returns, per step, the normed outputs [B, N, hidden]
    (logits: the head's lm_head, or the target's for MTP)."""
    B, N = tokens[0].shape
    steps, eps = len(tokens), cfg["rms_norm_eps"]
    pre = "midlayer." if kind == "eagle3" else f"model.layers.{cfg['num_hidden_layers']}."
    positions = torch.cat([torch.arange(N, device=embed.device) + s for s in range(steps)])
    mask = unrolled_mask(N, steps, embed.device)
    state = hidden @ p["fc.weight"].t() if kind == "eagle3" else hidden
    outs = []
    xs, residuals = [], []
    for s in range(steps):  # the inputs of every step are known up front (teacher forcing) but the
        # states of step s+1 come from step s, so steps run in sequence over a growing attention
        e = embed[tokens[s]]
        if kind == "eagle3":
            x = torch.cat([_rms(e, p[pre + "input_layernorm.weight"], eps), _rms(state, p[pre + "hidden_norm.weight"], eps)], -1)
            residual = state
        else:
            e = e * (positions[s * N:(s + 1) * N] != 0).to(e.dtype)[None, :, None]
            x = torch.cat([_rms(e, p[pre + "enorm.weight"], eps), _rms(state, p[pre + "hnorm.weight"], eps)], -1)
            residual = x @ p[pre + "eh_proj.weight"].t()
            x = _rms(residual, p[pre + "input_layernorm.weight"], eps)
        xs.append(x)
        residuals.append(residual)
        n = (s + 1) * N
        attn = _attend(p, pre, cfg, torch.cat(xs, 1), positions[:n], mask[:n, :n], kind == "mtp")[:, s * N:]
        h = residual + attn
        h = h + _mlp(p, pre, _rms(h, p[pre + "post_attention_layernorm.weight"], eps))
        norm = p["norm.weight"] if kind == "eagle3" else p[pre + "shared_head.norm.weight"]
        outs.append(_rms(h, norm, eps))
        state = h
    return outs
