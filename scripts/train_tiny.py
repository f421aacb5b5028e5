#!/usr/bin/env python3
"""Train lanner-tiny (Qwen3, ~16M parameters), lanner-tiny-draft (~3M), and two speculative heads
for lanner-tiny on its own hidden states, lanner-tiny-eagle3 (EAGLE-3 layout) and lanner-tiny-mtp
(DeepSeek-V3's MTP layout), on every Python source file of the running Python installation (the
standard library and site-packages), and save them as Hugging Face folders (bf16).

    python scripts/train_tiny.py --out /tmp/tiny          # on a GPU: a few minutes
    python scripts/train_tiny.py --plot-only /tmp/tiny/train_log.json

The byte-level BPE tokenizer is lanner-tiny's (--tokenizer; --train-tokenizer trains a new one).
Everything is seeded; 2% of the files (by a hash of their path) are held out and give the
reported loss and perplexity. The heads are trained unrolled over --head-steps draft steps (each
step reads the previous step's own state, as at inference), to match the target's distribution.
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

from lanner.models.tiny import (END_OF_TEXT, IM_END, corpus_name, eagle3_config, is_heldout, mtp_config, pruned_vocab,
                                python_files, read_text, save_head, save_model_folder, train_bpe_tokenizer,
                                unrolled_head)

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
HEADS = ("lanner-tiny-eagle3", "lanner-tiny-mtp")
DRAFT_VOCAB = 4096  # EAGLE-3's pruned vocabulary: the most frequent half of the tokens
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_corpus(tokenizer_path: str | None, vocab_size: int, max_files: int | None = None):
    files = python_files()[:max_files]
    names = [corpus_name(root, rel) for root, rel in files]
    train_files = [i for i, n in enumerate(names) if not is_heldout(n)]
    eval_files = [i for i, n in enumerate(names) if is_heldout(n)]
    texts = [read_text(root, rel) for root, rel in files]
    t0 = time.time()
    if tokenizer_path:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    else:
        tokenizer = train_bpe_tokenizer((texts[i] for i in train_files), vocab_size)
    tok_time = time.time() - t0
    eot = tokenizer.convert_tokens_to_ids(END_OF_TEXT)

    def ids(indices: list[int]) -> torch.Tensor:
        out = []
        for i in range(0, len(indices), 512):
            batch = [texts[j] for j in indices[i:i + 512]]
            out += [t for seq in tokenizer(batch, add_special_tokens=False)["input_ids"] for t in seq + [eot]]
        return torch.tensor(out, dtype=torch.long)

    listing = "\n".join(os.path.join(root, rel) for root, rel in files)
    info = {
        "python": platform.python_version(), "roots": sorted({root for root, _ in files}),
        "files": len(files), "train_files": len(train_files), "heldout_files": len(eval_files),
        "chars": sum(len(t) for t in texts),
        "file_list_sha256": hashlib.sha256(listing.encode()).hexdigest(),
        "tokenizer": tokenizer_path or "trained", "tokenizer_seconds": round(tok_time, 1),
        "heldout_names": [names[i] for i in eval_files],
    }
    return tokenizer, ids(train_files), ids(eval_files), info, listing


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


def head_tensors(kind: str, cfg: dict, target, seed: int) -> dict[str, torch.Tensor]:
    """Initial weights of a head under its checkpoint names: projections small and random,
    norms 1; the MTP layer starts from the target's last decoder layer."""
    from lanner.models.tiny import eagle3_shapes, mtp_shapes

    gen = torch.Generator().manual_seed(seed)
    shapes = eagle3_shapes(cfg) if kind == "eagle3" else mtp_shapes(cfg)
    out = {name: torch.ones(shape) if "norm" in name else torch.randn(shape, generator=gen) * 0.02
           for name, shape in shapes.items()}
    if kind == "mtp":
        last = {k.split("layers.")[1].split(".", 1)[1]: v for k, v in target.state_dict().items()
                if k.startswith(f"model.layers.{cfg['num_hidden_layers'] - 1}.")}
        for name in out:
            rest = name.split(f"layers.{cfg['num_hidden_layers']}.", 1)[1]
            if rest in last:
                out[name] = last[rest].float().cpu().clone()
    return out


def head_batch(target, rows: torch.Tensor, kind: str, cfg: dict, steps: int, t2d: torch.Tensor | None):
    """The target's states and its next-token distributions for a batch of token rows
    [B, N + steps + 1]: what the head reads, and what each unrolled step should predict."""
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = target(rows[:, :-1], output_hidden_states=True)
    hs = out.hidden_states
    n = rows.shape[1] - steps - 1
    if kind == "eagle3":
        layers = cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"]
        hidden = torch.cat([hs[i][:, :n] for i in layers], -1).float()
    else:
        hidden = hs[-1][:, :n].float()
    logits = out.logits.float()
    if t2d is not None:
        logits = logits[..., t2d]
    targets = [torch.softmax(logits[:, 1 + s:1 + s + n], -1) for s in range(steps)]
    tokens = [rows[:, 1 + s:1 + s + n] for s in range(steps)]
    return hidden, tokens, targets


def train_head(kind: str, target, target_cfg: dict, train_ids, eval_ids, counts, args, log: dict):
    name = f"lanner-tiny-{kind}"
    cfg = eagle3_config(target_cfg, DRAFT_VOCAB, args.head_intermediate) if kind == "eagle3" else mtp_config(target_cfg)
    extra = {}
    t2d = None
    if kind == "eagle3":
        d2t, t2d = pruned_vocab(counts, DRAFT_VOCAB)
        extra = {"d2t": d2t, "t2d": t2d}
        t2d = t2d.to(DEVICE)
    torch.manual_seed(args.seed)
    params = {k: torch.nn.Parameter(v.to(DEVICE)) for k, v in head_tensors(kind, cfg, target, args.seed).items()}
    embed = target.model.embed_tokens.weight.detach().float()
    head_out = target.lm_head.weight.detach().float()
    opt = torch.optim.AdamW(params.values(), lr=args.head_lr, betas=(0.9, 0.95), weight_decay=0.0)
    steps, seq = args.head_steps, args.head_seq
    data = train_ids.to(DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    offsets = torch.arange(seq + steps + 1, device=DEVICE)

    def loss_of(rows):
        hidden, tokens, targets = head_batch(target, rows, kind, cfg, steps, t2d)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            outs = unrolled_head(kind, params, cfg, embed, tokens, hidden)
        total, accs = 0.0, []
        for s, (o, p) in enumerate(zip(outs, targets)):
            logits = o.float() @ (params["lm_head.weight"] if kind == "eagle3" else head_out).t()
            total = total + 0.8 ** s * -(p * torch.log_softmax(logits, -1)).sum(-1).mean()
            accs.append((logits.argmax(-1) == p.argmax(-1)).float().mean().item())
        return total, accs

    curve, t0, done = [], time.time(), 0
    for step in range(args.head_train_steps):
        if time.time() - t0 > args.head_minutes * 60:
            print(f"{name}: time budget reached after {step} steps", flush=True)
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.head_train_steps, args.head_lr, args.warmup)
        starts = torch.randint(0, len(data) - len(offsets), (args.head_batch,), device=DEVICE, generator=gen)
        loss, accs = loss_of(data[starts[:, None] + offsets])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        opt.step()
        done = step + 1
        if step % args.log_every == 0:
            point = {"step": step, "loss": round(loss.item(), 4), "top1_per_step": [round(a, 3) for a in accs],
                     "seconds": round(time.time() - t0, 1)}
            curve.append(point)
            print(name, json.dumps(point), flush=True)
    with torch.no_grad():
        rows = torch.stack([eval_ids[j * len(offsets):(j + 1) * len(offsets)] for j in range(32)]).to(DEVICE)
        loss, accs = loss_of(rows)
    log[name] = {"parameters": sum(p.numel() for p in params.values()), "train_steps": done,
                 "unrolled_steps": steps, "seconds": round(time.time() - t0, 1),
                 "heldout_loss": round(loss.item(), 4), "heldout_top1_per_step": [round(a, 3) for a in accs],
                 "curve": curve}
    tensors = {k: v.detach().to(torch.bfloat16).cpu() for k, v in params.items()}
    save_head(os.path.join(args.out, name), {**cfg, "torch_dtype": "bfloat16"}, {**tensors, **extra})


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
    ax.set_title(f"lanner-tiny on the Python {log['corpus']['python']} installation's sources")
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
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(__file__), "..", "lanner", "assets",
                                                       "lanner-tiny"), help="the tokenizer to keep")
    p.add_argument("--train-tokenizer", action="store_true", help="train a new tokenizer instead")
    p.add_argument("--head-steps", type=int, default=3, help="draft steps a head is unrolled over in training")
    p.add_argument("--head-train-steps", type=int, default=1500)
    p.add_argument("--head-batch", type=int, default=32)
    p.add_argument("--head-seq", type=int, default=256)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--head-intermediate", type=int, default=1024)
    p.add_argument("--head-minutes", type=float, default=1.2)
    p.add_argument("--max-files", type=int, help="a smoke test on the first files only")
    p.add_argument("--only-heads", action="store_true", help="train the heads of an existing --out/lanner-tiny")
    args = p.parse_args()
    if args.plot_only:
        with open(args.plot_only) as f:
            plot(json.load(f), os.path.join(os.path.dirname(args.plot_only), "training_curve.png"))
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    t_all = time.time()
    tokenizer, train_ids, eval_ids, corpus, listing = build_corpus(
        None if args.train_tokenizer else args.tokenizer, args.vocab_size, args.max_files)
    corpus.update(train_tokens=len(train_ids), heldout_tokens=len(eval_ids))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "file_list.txt"), "w") as f:
        f.write(listing)
    print("corpus", json.dumps({k: v for k, v in corpus.items() if k != "heldout_names"}), flush=True)
    log = {"corpus": corpus, "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu", "torch": torch.__version__, "args": vars(args)}
    models = {}
    for name in SHAPES:
        if args.only_heads:
            from transformers import AutoModelForCausalLM

            models[name] = AutoModelForCausalLM.from_pretrained(os.path.join(args.out, name)).to(DEVICE)
            continue
        steps = args.steps if name == "lanner-tiny" else args.draft_steps
        run_args = argparse.Namespace(**{**vars(args), "steps": steps,
                                         "max_minutes": args.max_minutes * (1 if name == "lanner-tiny" else 0.5)})
        models[name] = train(name, make_config(tokenizer, SHAPES[name]), train_ids, eval_ids, run_args, log)
        save_model_folder(os.path.join(args.out, name), models[name], tokenizer, SAMPLING)
    log["draft_agreement"] = round(draft_agreement(models["lanner-tiny"], models["lanner-tiny-draft"],
                                                   eval_ids, args.seq), 4)
    target = models["lanner-tiny"].eval()
    for p_ in target.parameters():
        p_.requires_grad_(False)
    with open(os.path.join(args.out, "lanner-tiny", "config.json")) as f:
        target_cfg = json.load(f)
    counts = torch.bincount(train_ids, minlength=len(tokenizer))
    for kind in ("eagle3", "mtp"):
        train_head(kind, target, target_cfg, train_ids, eval_ids, counts, args, log)
    log["total_seconds"] = round(time.time() - t_all, 1)
    print("summary", json.dumps({k: v for k, v in log.items() if k not in (*SHAPES, "corpus")}), flush=True)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(log, f, indent=1)
    try:
        plot(log, os.path.join(args.out, "training_curve.png"))
    except ImportError:
        print("matplotlib is not installed: draw the curve later with --plot-only", file=sys.stderr)


if __name__ == "__main__":
    main()
