"""What rejected requests leave in memory, counted where the engine runs (also inside an engine
process, through AsyncEngine.call: these functions must pickle, so they live in a module)."""
from __future__ import annotations

import gc


def hold_garbage(engine=None) -> None:
    """From now on, garbage in reference cycles stays until token_lists() (the collector is off)."""
    gc.collect()
    gc.disable()


def token_lists(engine, length: int, token: int) -> int:
    """Lists of `length` copies of `token` in memory, garbage included; turns the collector back on."""
    try:
        return sum(1 for o in gc.get_objects()
                   if type(o) is list and len(o) == length and o[:1] == [token] and o.count(token) == length)
    finally:
        gc.enable()
