"""Top-p's filter on the GPU: the threshold search (kernels/top_p.py) against the sort it replaces, at
several batch sizes over a 152k vocabulary (issue [12]: Llama 3's generation_config samples with top-p
alone), and the threshold alone for several search shapes (pivots x passes, blocks skipped or not). Usage: python scripts/top_p_probe.py [--vocab 151936]. Prints a JSON line a batch size (ms)."""
from __future__ import annotations

import argparse
import json
from functools import partial

import torch

from lanner.bench.common import time_ms
from lanner.kernels.top_p import PASSES, PIVOTS, top_p_threshold
from lanner.sampling.sampler import _filtered


SHAPES = ((PIVOTS, PASSES, True), (32, 6, False), (16, 8, True), (8, 10, True))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    args = ap.parse_args()
    for B in (1, 8, 64, 256):
        logits = 6 * torch.randn(B, args.vocab, device="cuda")
        table = torch.tensor([[1.0, args.vocab, 0.9, 0.0]], device="cuda").repeat(B, 1)
        probs = logits.softmax(dim=-1)
        top_p = table[:, 2].contiguous()
        row = {"batch": B, "vocab": args.vocab,
               "sort_filter_ms": round(time_ms(partial(_filtered, logits, table, args.vocab, False), 20), 3),
               "search_filter_ms": round(time_ms(partial(_filtered, logits, table, -1, False), 20), 3)}
        want = top_p_threshold(probs, top_p)
        for pivots, passes, skip in SHAPES:  # the default first, then the eighth session's (no skip), then others
            name = f"threshold_{pivots}x{passes}{'_skip' if skip else ''}"
            got = top_p_threshold(probs, top_p, pivots, passes, skip)
            kept = probs >= got[:, None]  # each shape's nucleus reaches top_p, and is the least that does
            assert ((probs * kept).sum(-1) >= top_p - 1e-5).all() and \
                ((probs * (probs > got[:, None])).sum(-1) < top_p).all(), name
            row[f"{name}_rows_unlike_default"] = int((got != want).sum())  # float32 sums in another order
            row[f"{name}_ms"] = round(time_ms(partial(top_p_threshold, probs, top_p, pivots, passes, skip), 20), 3)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
