"""Hugging Face transformers on the same workload, in the same process, as the baseline."""
from __future__ import annotations

import gc

import torch

from lanner.bench.common import timed


def load_hf(path: str, dtype: torch.dtype, device: torch.device):
    """transformers' model for `path` (a folder or a config.json), random weights for a bare config."""
    from transformers import AutoModelForCausalLM

    from lanner.models.loader import load_hf_config

    cfg = load_hf_config(path)
    if path.endswith(".json"):
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    return model.eval()


@torch.inference_mode()
def hf_latency(model, prompt: list[int], output_len: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0)
    model.generate(ids[:, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
    _, secs = timed(lambda: model.generate(ids, **kwargs))
    return {"method": "generate, batch 1, dynamic cache", "wall_s": secs, "tok_per_s": output_len / secs}


@torch.no_grad()  # not inference_mode: generate_batch's worker thread updates tensors made here in place
def hf_throughput(model, requests: list[tuple[list[int], int]], batch: int = 32) -> dict:
    """transformers' continuous batching (generate_batch) when it produces every token,
    else padded static batches. Throughput counts only tokens actually generated."""
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    want = sum(m for _, m in requests)
    max_out = max(m for _, m in requests)
    note = ""
    try:
        gen = GenerationConfig(max_new_tokens=max_out, do_sample=False, eos_token_id=-1, pad_token_id=0)
        results, secs = timed(lambda: model.generate_batch(inputs=[p for p, _ in requests], generation_config=gen,
                                                            progress_bar=False))
        got = sum(len(r.generated_tokens) for r in results.values() if r.error is None)
        if got >= want:
            return {"method": "generate_batch (continuous batching)", "wall_s": secs,
                    "output_tokens": got, "output_tok_per_s": got / secs}
        errors = {r.error for r in results.values() if r.error is not None}
        note = f"generate_batch produced {got} of {want} tokens{f' ({sorted(errors)[0]})' if errors else ''}; "
    except Exception as e:  # older or different transformers
        note = f"generate_batch failed ({type(e).__name__}: {e}); "
    print(f"transformers: {note}falling back to padded batches", flush=True)
    gc.collect()
    torch.cuda.empty_cache()

    def run() -> int:
        got = 0
        for i in range(0, len(requests), batch):
            chunk = [p for p, _ in requests[i:i + batch]]
            width = max(map(len, chunk))
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_out, min_new_tokens=max_out,
                                 do_sample=False, pad_token_id=0)
            got += (out.shape[1] - width) * len(chunk)
        return got

    got, secs = timed(run)
    return {"method": f"{note}padded static batches of {batch}, each run to the longest output", "wall_s": secs,
            "output_tokens": got, "output_tok_per_s": min(got, want) / secs}


def release(model) -> None:
    del model
    gc.collect()
    torch.cuda.empty_cache()
