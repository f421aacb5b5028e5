#!/usr/bin/env python3
"""Train lanner-tiny (Qwen3, ~16M parameters) and lanner-tiny-draft (~3M) on the
source of the running Python's standard library, and save both as Hugging Face
folders (bf16) with a shared byte-level BPE tokenizer.

    python scripts/train_tiny.py --out /tmp/tiny          # on a GPU: a few minutes
    python scripts/train_tiny.py --plot-only /tmp/tiny/train_log.json

Everything is seeded; 2% of the files (by a hash of their path) are held out and
give the reported loss and perplexity.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from lanner.models.tiny import (END_OF_TEXT, IM_END, is_heldout, read_text, save_model_folder, stdlib_files,
                                train_bpe_tokenizer)

SHAPES = {
    "lanner-tiny": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=64),
    "lanner-tiny-draft": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=3,
                              num_key_value_heads=1, head_dim=64),
}
# Recommended sampling, written to generation_config.json: greedy decoding of so small a
# model falls into repetition loops; this gives varied, plausible code.
SAMPLING = {"temperature": 0.5, "top_p": 0.95, "repetition_penalty": 1.1}
MAX_PARAMS = {"lanner-tiny": 25e6, "lanner-tiny-draft": 4e6}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_corpus(vocab_size: int):
    root, files = stdlib_files()
    train_files = [f for f in files if not is_heldout(f)]
    eval_files = [f for f in files if is_heldout(f)]
    texts = {f: read_text(root, f) for f in files}
    t0 = time.time()
    tokenizer = train_bpe_tokenizer((texts[f] for f in train_files), vocab_size)
    tok_time = time.time() - t0
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)

    def ids(names: list[str]) -> torch.Tensor:
        encoded = tokenizer([texts[f] for f in names], add_special_tokens=False)["input_ids"]
        return torch.tensor([t for seq in encoded for t in seq + [eot]], dtype=torch.long)

    info = {
        "python": platform.python_version(),
        "stdlib_root": root,
        "files": len(files), "train_files": len(train_files), "heldout_files": len(eval_files),
        "file_list_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "tokenizer_seconds": round(tok_time, 1),
    }
    return tokenizer, ids(train_files), ids(eval_files), info


def make_config(tokenizer, shape: dict):
    from transformers import Qwen3Config

    cfg = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=2048, rope_theta=10000.0,
                      tie_word_embeddings=True, eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
                      bos_token_id=tokenizer.convert_tokens_to_ids(END_OF_TEXT), **shape)
    cfg.architectures = ["Qwen3ForCausalLM"]
    return cfg


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


@torch.no_grad()
def evaluate(model, data: torch.Tensor, seq: int, batch: int = 32) -> float:
    """Mean next-token loss over non-overlapping windows of the held-out tokens."""
    model.eval()
    n = (len(data) - 1) // seq
    x = data[:n * seq + 1]
    total, count = 0.0, 0
    for i in range(0, n, batch):
        rows = torch.stack([x[j * seq:(j + 1) * seq + 1] for j in range(i, min(n, i + batch))]).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(rows[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten(), reduction="sum").item()
        count += rows[:, 1:].numel()
    model.train()
    return total / count


def train(name: str, cfg, train_ids: torch.Tensor, eval_ids: torch.Tensor, args, log: dict):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(DEVICE).train()
    params = sum(p.numel() for p in model.parameters())
    assert params <= MAX_PARAMS[name], f"{name} has {params} parameters"
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=DEVICE.type == "cuda")
    data = train_ids.to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    offsets = torch.arange(args.seq + 1, device=DEVICE)
    curve = []
    t0 = time.time()
    for step in range(args.steps):
        if time.time() - t0 > args.max_minutes * 60:  # keep the whole run inside its time budget
            print(f"{name}: time budget reached after {step} steps", flush=True)
            args.steps = step
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        starts = torch.randint(0, len(data) - args.seq - 1, (args.batch,), device=DEVICE, generator=gen)
        rows = data[starts[:, None] + offsets]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            logits = model(rows[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), rows[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            point = {"step": step, "tokens": (step + 1) * args.batch * args.seq, "train_loss": round(loss.item(), 4),
                     "seconds": round(time.time() - t0, 1)}
            if step % (args.log_every * 5) == 0 or step == args.steps - 1:
                point["heldout_loss"] = round(evaluate(model, eval_ids, args.seq), 4)
            curve.append(point)
            print(name, json.dumps(point), flush=True)
    train_seconds = time.time() - t0
    model = model.to(torch.bfloat16)
    heldout = evaluate(model, eval_ids, args.seq)
    log[name] = {"parameters": params, "steps": args.steps, "batch": args.batch, "seq": args.seq, "lr": args.lr,
                 "train_seconds": round(train_seconds, 1), "heldout_loss_bf16": round(heldout, 4),
                 "heldout_perplexity_bf16": round(math.exp(heldout), 3), "curve": curve}
    return model


@torch.no_grad()
def draft_agreement(target, draft, eval_ids: torch.Tensor, seq: int, windows: int = 64) -> float:
    """Fraction of held-out positions where the draft's greedy next token equals the target's."""
    rows = torch.stack([eval_ids[j * seq:(j + 1) * seq] for j in range(windows)]).to(DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        a = target(rows).logits.argmax(-1)
        b = draft(rows).logits.argmax(-1)
    return (a == b).float().mean().item()


def plot(log: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in SHAPES:
        curve = log[name]["curve"]
        ax.plot([p["tokens"] / 1e6 for p in curve], [p["train_loss"] for p in curve], label=f"{name} train")
        held = [p for p in curve if "heldout_loss" in p]
        ax.plot([p["tokens"] / 1e6 for p in held], [p["heldout_loss"] for p in held], "o--", label=f"{name} held-out")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"lanner-tiny on the Python {log['corpus']['python']} standard library")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="tiny-out")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--steps", type=int, default=320)
    p.add_argument("--draft-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=4.0, help="stop a model's training early after this")
    p.add_argument("--plot-only", metavar="LOG_JSON", help="only draw the curve of an earlier run")
    args = p.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(os.path.dirname(args.plot_only), "training_curve.png"))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    t_all = time.time()
    tokenizer, train_ids, eval_ids, corpus = build_corpus(args.vocab_size)
    corpus.update(train_tokens=len(train_ids), heldout_tokens=len(eval_ids))
    print("corpus", json.dumps(corpus), flush=True)
    log = {"corpus": corpus, "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__, "args": vars(args)}
    models = {}
    for name in SHAPES:
        steps = args.steps if name == "lanner-tiny" else args.draft_steps
        run_args = argparse.Namespace(**{**vars(args), "steps": steps,
                                         "max_minutes": args.max_minutes * (1 if name == "lanner-tiny" else 0.5)})
        models[name] = train(name, make_config(tokenizer, SHAPES[name]), train_ids, eval_ids, run_args, log)
        save_model_folder(os.path.join(args.out, name), models[name], tokenizer, SAMPLING)
    log["draft_agreement"] = round(draft_agreement(models["lanner-tiny"], models["lanner-tiny-draft"],
                                                   eval_ids, args.seq), 4)
    log["total_seconds"] = round(time.time() - t_all, 1)
    print("summary", json.dumps({k: v for k, v in log.items() if k not in SHAPES}), flush=True)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    try:
        plot(log, os.path.join(args.out, "training_curve.png"))
    except ImportError:
        print("matplotlib is not installed: draw the curve later with --plot-only", file=sys.stderr)


if __name__ == "__main__":
    main()
