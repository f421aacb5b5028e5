"""`lanner bench structured`: what structured outputs cost (issue [11]). Same engine, same prompts:
decode tok/s unconstrained vs under a JSON schema at each batch size, and the wait for the first
token with a schema never seen (compiled while the request waits) vs a cached one.

The schema is an array of at least 10,000 objects, so no constrained output can end before
`--output-len` and both runs decode the same number of tokens. With `--config` (random
weights) the model has no tokenizer: `--train-tokenizer-vocab N` trains a byte-level BPE of N
tokens on this Python installation's sources (the grammar's cost grows with the vocabulary)."""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from lanner.bench import common
from lanner.bench.common import Workload
from lanner.core.request import SamplingParams

ITEM = {"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string"},
                                         "price": {"type": "number"}, "tags": {"type": "array",
                                                                                "items": {"type": "string"}},
                                         "in_stock": {"type": "boolean"}},
        "required": ["id", "name", "price", "tags", "in_stock"]}
ENDLESS = {"type": "array", "items": ITEM, "minItems": 10000}


def fresh_schema(tag: int, fields: int) -> dict:
    """A schema no earlier request used (a new compile), of `fields` nested objects."""
    props = {f"field_{tag}_{i}": {"type": "object", "properties": {"a": {"type": "integer"},
                                                                  "b": {"enum": ["x", "y", "z"]},
                                                                  "c": {"type": "string", "maxLength": 16}},
                                  "required": ["a", "b", "c"]} for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props)}


class HostTimes:
    """Host seconds spent in the parts of a step (instance attributes wrap the methods): where a
    constrained step's extra time goes."""

    PARTS = (("engine", "_postprocess"), ("runner", "launch"), ("runner", "sample"), ("grammars", "bitmask"))

    def __init__(self, llm):
        self.seconds = dict.fromkeys((name for _, name in self.PARTS), 0.0)
        owners = {"engine": llm.engine, "runner": llm.engine.runner, "grammars": llm.engine.grammars}
        for owner, name in self.PARTS:
            setattr(owners[owner], name, self._timed(name, getattr(owners[owner], name)))

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return call

    def since(self, before: dict, steps: int) -> dict:
        return {k: round((v - before[k]) * 1e3 / max(steps, 1), 3) for k, v in self.seconds.items()}


def decode_rates(llm, prompts: list[list[int]], output_len: int, batch_sizes: list[int]) -> list[dict]:
    plain = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    constrained = SamplingParams(temperature=0.0, max_tokens=output_len, structured_outputs={"json": ENDLESS})
    llm.generate(prompts[:1], constrained, use_tqdm=False)  # compiles the schema, warms the path
    rows, host = [], HostTimes(llm)
    for bs in batch_sizes:
        row = {"batch_size": bs}
        for name, params in (("unconstrained", plain), ("json_schema", constrained)):
            before, steps = dict(host.seconds), llm.engine.num_steps
            outs, secs = common.timed(lambda bs=bs, params=params: llm.generate(prompts[:bs], params, use_tqdm=False))
            tokens, steps = sum(len(o.outputs[0].token_ids) for o in outs), llm.engine.num_steps - steps
            row[name] = {"output_tok_per_s": round(tokens / secs, 1), "tokens": tokens,
                         "ms_per_step": round(secs * 1e3 / steps, 3), "host_ms_per_step": host.since(before, steps),
                         "finish_reasons": sorted({o.outputs[0].finish_reason for o in outs})}
        row["slowdown"] = round(1 - row["json_schema"]["output_tok_per_s"] / row["unconstrained"]["output_tok_per_s"],
                                4)
        print(row, flush=True)
        rows.append(row)
    return rows


def first_token_waits(llm, prompt: list[int], fields: int, repeats: int) -> dict:
    """TTFT at batch 1 with a new schema (compiled while the request waits) and the same again."""
    def ttft(schema: dict) -> float:
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2,
                                                    structured_outputs={"json": schema}), use_tqdm=False)[0]
        return (out.metrics.first_token_time - out.metrics.arrival_time) * 1e3

    plain = [(o.metrics.first_token_time - o.metrics.arrival_time) * 1e3 for o in
             (llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2), use_tqdm=False)[0]
              for _ in range(repeats))]
    new, cached = [], []
    for i in range(repeats):
        schema = fresh_schema(int(time.time() * 1e6) + i, fields)
        new.append(ttft(schema))
        cached.append(ttft(schema))
    return {"fields": fields, "unconstrained_ms": round(statistics.median(plain), 2),
            "new_schema_ms": round(statistics.median(new), 2), "cached_schema_ms": round(statistics.median(cached), 2)}


def main(args: argparse.Namespace, engine_kwargs: dict) -> None:
    from lanner.engine.llm import LLM

    if args.config:
        engine_kwargs = {"model": args.config, "load_format": "dummy", **engine_kwargs}
    trained = None
    if args.train_tokenizer_vocab:
        from lanner.models.tiny import python_files, read_text, train_bpe_tokenizer

        start = time.perf_counter()
        texts = [read_text(root, path) for root, path in python_files()[:args.tokenizer_files]]
        tokenizer = train_bpe_tokenizer(texts, args.train_tokenizer_vocab)
        folder = tempfile.mkdtemp(prefix="lanner-bench-tokenizer-")
        tokenizer.save_pretrained(folder)
        engine_kwargs["tokenizer"] = folder
        trained = {"vocab": len(tokenizer), "seconds": round(time.perf_counter() - start, 1)}
    llm = LLM(**engine_kwargs)
    prompts = [p for p, _ in Workload(max(args.batch_sizes), (args.input_len, args.input_len), (1, 1))
               .requests(min(llm.engine.vocab_size, len(llm.engine.tokenizer)))]
    results = {"decode": decode_rates(llm, prompts, args.output_len, args.batch_sizes),
               "first_token": [first_token_waits(llm, prompts[0], f, args.repeats) for f in args.schema_fields],
               "grammars_compiled": llm.engine.grammars.num_compiled}
    workload = {"input_len": args.input_len, "output_len": args.output_len, "greedy": True,
                "schema": "array of >= 10000 objects (id, name, price, tags, in_stock)",
                "tokenizer": trained and f"byte-level BPE of {trained['vocab']} tokens trained on this Python "
                                         f"installation's sources in {trained['seconds']} s"}
    common.emit(common.record("structured", common.model_summary(llm.engine.hf_config), workload, results,
                              llm.engine.config.to_dict()), args.output_json)


def add_parser(kinds) -> None:
    p = kinds.add_parser("structured", help="tok/s under a JSON schema vs unconstrained; first-token wait for a "
                                            "new vs a cached schema")
    p.add_argument("--config", default=None, help="a config.json: random weights of that shape (dummy load)")
    p.add_argument("--train-tokenizer-vocab", type=int, default=None,
                   help="train a byte-level BPE of this many tokens to serve as the tokenizer (with --config)")
    p.add_argument("--tokenizer-files", type=int, default=6000, help="Python files it trains on, at most")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--schema-fields", type=int, nargs="+", default=[4, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--output-json", default=None)
