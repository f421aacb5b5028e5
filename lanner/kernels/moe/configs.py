"""Tile configs of fused_moe: a table tuned on the GPU by scripts/tune_moe.py, else a default by
token count. Pure Python, so the tables can be read and written without Triton or a GPU.

A table is configs/<device name, spaces as _>/E=<E>,H=<H>,I=<I>,<layout>.json, mapping token
counts (as strings) to configs: {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

CONFIG_DIR = Path(__file__).parent / "configs"
LAYOUTS = ("contiguous", "masked")


def table_path(num_experts: int, hidden: int, inter: int, layout: str, device_name: str,
               root: Path = CONFIG_DIR) -> Path:
    return Path(root) / device_name.replace(" ", "_") / f"E={num_experts},H={hidden},I={inter},{layout}.json"


@functools.cache
def load_table(path: Path) -> dict[int, dict] | None:
    """{token count: config}, or None where no table was tuned; read once per path."""
    if not path.is_file():
        return None
    with open(path) as f:
        return {int(tokens): config for tokens, config in json.load(f).items()}


def default_config(num_tokens: int) -> dict:
    """Untuned: tiles of 16 rows where experts get a few tokens each (decode), larger ones where
    the GEMMs are big enough to be compute bound."""
    if num_tokens <= 64:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 3}
    if num_tokens <= 1024:
        return {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}


def get_config(num_experts: int, hidden: int, inter: int, num_tokens: int, layout: str, device_name: str,
               root: Path = CONFIG_DIR) -> dict:
    """The tuned config of the largest token count <= num_tokens (else of the smallest), or the default."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown MoE layout {layout!r}: one of {LAYOUTS}")
    table = load_table(table_path(num_experts, hidden, inter, layout, device_name, root))
    if not table:
        return default_config(num_tokens)
    below = [t for t in table if t <= num_tokens]
    return dict(table[max(below) if below else min(table)])
