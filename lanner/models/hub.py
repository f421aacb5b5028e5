"""Model names as vLLM takes them: a local folder or config.json as it is, otherwise a
Hugging Face repo id, found in the local cache first and downloaded only when the hub
is reachable (not with HF_HUB_OFFLINE=1)."""
from __future__ import annotations

import os
import re

from lanner.errors import ConfigError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# what lanner reads from a model repo: no other weight formats, no code
FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
         "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
         "tokenizer.model", "chat_template.jinja", "chat_template.json", "added_tokens.json"]


def hub_offline() -> bool:
    # read at call time: huggingface_hub reads its constants once, at import
    value = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE", ""))
    return value.strip().lower() in ("1", "true", "yes", "on")


def resolve_model_path(name: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """A local path for `name`: itself if it exists here, else the snapshot folder of the repo id."""
    if os.path.exists(name):
        return name
    if not REPO_ID.match(name) or ".." in name:
        raise ConfigError(f"model {name!r} is neither a local folder or config.json nor a Hugging Face repo id "
                          "(org/name)")
    from huggingface_hub import snapshot_download

    where = f"{name!r}" + (f" at revision {revision!r}" if revision else "")
    try:
        folder = snapshot_download(name, revision=revision, cache_dir=download_dir, local_files_only=True,
                                   allow_patterns=FILES)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    except Exception:  # not in the cache (or only part of it): download, if allowed
        pass
    if hub_offline():
        raise ConfigError(f"{where} is not in the Hugging Face cache ({download_dir or 'the default cache'}) and "
                          "HF_HUB_OFFLINE is set; download it first or pass a local folder")
    try:
        return snapshot_download(name, revision=revision, cache_dir=download_dir, allow_patterns=FILES)
    except Exception as e:
        raise ConfigError(f"cannot download {where} from the Hugging Face hub: {type(e).__name__}: {e}") from e
