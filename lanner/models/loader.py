"""Load a model folder: config.json, safetensors weights (single or sharded),
tokenizer, generation_config.json; or random weights with `load_format="dummy"`."""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lanner.errors import ConfigError, UnsupportedModel
from lanner.layers.moe.experts import checkpoint_target as expert_target
from lanner.models.registry import architecture_of, build_model


@dataclass
class LoadedModel:
    model: nn.Module
    hf_config: Any
    tokenizer: Any | None
    eos_token_ids: set[int]
    sampling_defaults: dict  # the model's recommended sampling settings (generation_config.json)


def load_hf_config(path: str, overrides: dict | None = None) -> Any:
    """The model's config; `overrides` (vLLM's hf_overrides) are merged into config.json first."""
    from transformers import AutoConfig

    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise ConfigError(f"{os.path.dirname(path)!r} has no config.json")
    if not os.path.isfile(path):
        raise ConfigError(f"model {path!r} is not a local folder or config.json (lanner does not download models)")
    with open(path) as f:
        raw = {**json.load(f), **(overrides or {})}
    try:
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    except KeyError as e:
        raise UnsupportedModel(f"{path}: the config has no model_type") from e
    except Exception as e:  # transformers' validators raise several kinds (ValueError, StrictDataclassError, ...)
        where = f" with hf_overrides {overrides}" if overrides else ""
        raise UnsupportedModel(f"{path}{where}: transformers cannot read this config ({e})") from e


def load_tokenizer(path: str) -> Any | None:
    """The folder's tokenizer, or None if it has none (then prompts must be token ids)."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path) or not any(
            os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    return AutoTokenizer.from_pretrained(path)


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_config(path: str, source: str = "auto") -> dict:
    """generation_config.json of the model folder ('auto'), of another folder, or none ('vllm')."""
    if source == "vllm":
        return {}
    folder = path if source == "auto" else source
    if source != "auto" and not os.path.isfile(os.path.join(folder, "generation_config.json")):
        raise ConfigError(f"generation_config: {folder!r} has no generation_config.json")
    gen_path = os.path.join(folder, "generation_config.json") if os.path.isdir(folder) else ""
    if not os.path.isfile(gen_path):
        return {}
    with open(gen_path) as f:
        return json.load(f)


def eos_token_ids(gen_config: dict, hf_config: Any) -> set[int]:
    eos = gen_config.get("eos_token_id", getattr(hf_config, "eos_token_id", None))
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def load_model(path: str, tokenizer_path: str | None, load_format: str, dtype: torch.dtype,
               device: torch.device, seed: int, hf_overrides: dict | None = None,
               generation_source: str = "auto") -> LoadedModel:
    hf_config = load_hf_config(path, hf_overrides)
    architecture_of(hf_config)  # fail early, before reading weights
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = build_model(hf_config)
    finally:
        torch.set_default_dtype(default_dtype)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        load_safetensors(model, path)
    model.eval()
    gen = generation_config(path, generation_source)
    defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if gen.get(k) is not None}
    # the model's eos tokens stay even without its sampling defaults ('vllm'): stopping is not sampling
    eos = eos_token_ids(gen if generation_source != "vllm" else generation_config(path), hf_config)
    return LoadedModel(model, hf_config, load_tokenizer(tokenizer_path or path), eos, defaults)


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise ConfigError(f"no model.safetensors or model.safetensors.index.json in {path!r} "
                      "(only safetensors are supported; use --load-format dummy for random weights)")


def iter_checkpoint(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _weight_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_safetensors(model: nn.Module, path: str) -> None:
    load_weights(model, iter_checkpoint(path))


# the other names calibrated fp8-KV checkpoints give a layer's KV-cache scales (vLLM reads them all):
# ModelOpt's on the projections, compressed-tensors' output scales, and the older single kv_scale
KV_SCALE_ALIASES = {".k_proj.k_scale": (".k_scale",), ".v_proj.v_scale": (".v_scale",),
                    ".k_proj.output_scale": (".k_scale",), ".v_proj.output_scale": (".v_scale",),
                    ".kv_scale": (".k_scale", ".v_scale")}


def our_names(name: str) -> tuple[str, ...]:
    """The model's names for a checkpoint tensor (two for a kv_scale: K's and V's)."""
    for suffix, ours in KV_SCALE_ALIASES.items():
        if name.endswith(suffix):
            return tuple(name[:-len(suffix)] + o for o in ours)
    return (name,)


def load_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], optional: tuple[str, ...] = ()) \
        -> set[str]:
    """Copy checkpoint tensors into the model's parameters (and the buffers it lists in
    `checkpoint_buffers`); every parameter but the `optional` ones must be given. Returns the
    names loaded."""
    params = dict(model.named_parameters())
    params.update((n, b) for n, b in model.named_buffers() if n in getattr(model, "checkpoint_buffers", ()))
    optional_buffers = {f"{prefix}.{b}" if prefix else b for prefix, module in model.named_modules()
                        for b in getattr(module, "optional_checkpoint_buffers", ()) if getattr(module, b) is not None}
    params.update((n, b) for n, b in model.named_buffers() if n in optional_buffers)
    packed = getattr(model, "packed_modules", {})
    loaded = set()
    with torch.no_grad():
        for name, tensor in ((ours, t) for theirs, t in tensors for ours in our_names(theirs)):
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and "lm_head.weight" not in params):
                continue  # recomputed / tied to the embedding
            target_name, shard = expert_target(name) or (name, None)
            for ckpt_part, (ours, index) in packed.items():
                if shard is None and f".{ckpt_part}." in name:
                    target_name, shard = name.replace(f".{ckpt_part}.", f".{ours}."), index
                    break
            if target_name not in params:
                raise ConfigError(f"checkpoint tensor {name!r} matches no parameter of the model")
            param = params[target_name]
            owner = model.get_submodule(target_name.rsplit(".", 1)[0]) if "." in target_name else model
            target = param if shard is None else owner.shard(param, shard)
            if target is None:  # another rank's expert (expert parallelism)
                continue
            if hasattr(owner, "checkpoint_slice"):  # tensor parallelism: this rank's piece
                tensor = owner.checkpoint_slice(param, tensor, shard)
            if target.shape != tensor.shape and not target.numel() == tensor.numel() == 1:  # a scalar as [1]
                raise ConfigError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model {tuple(target.shape)}")
            target.copy_(tensor.reshape(target.shape))
            loaded.add((target_name, shard))
    shards = Counter(n for n, _ in loaded)
    for name, count in shards.items():  # a stack of per-expert tensors is loaded only when every expert's part is
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if hasattr(owner, "num_shards") and count < owner.num_shards(params[name]):
            raise ConfigError(f"checkpoint lacks some experts' weights for {name}")
    names = set(shards)
    missing = sorted(set(params) - names - set(optional) - optional_buffers)
    if missing:
        raise ConfigError(f"checkpoint lacks weights for: {', '.join(missing[:10])}")
    return names
