"""What the probe scripts share: lists from the environment, and a model's layer GEMM shapes."""
import os


def env_tuples(name: str, default: list[tuple]) -> list[tuple]:
    """$NAME as tuples of ints ("64,2,3 128,4,2"), or `default`."""
    value = os.environ.get(name)
    return [tuple(int(x) for x in t.split(",")) for t in value.split()] if value else default


def env_named(name: str, items: list[tuple]) -> list[tuple]:
    """The items whose first field $NAME lists (names apart by spaces), or all of them."""
    value = os.environ.get(name)
    return [item for item in items if item[0] in value.split()] if value else items


def layer_gemm_shapes(cfg, lm_head: bool = False) -> dict[str, tuple[int, int]]:
    """A dense decoder layer's four GEMMs as (out features, in features), from its Hugging Face config
    (or any object with its fields); with `lm_head`, the LM head's too."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    d = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}
    return {**shapes, "lm_head": (cfg.vocab_size, h)} if lm_head else shapes
