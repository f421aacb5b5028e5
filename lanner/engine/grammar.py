"""Structured outputs: grammars compiled with xgrammar, one matcher per constrained request, and
the token bitmask of each step.

- A request's spec is parsed when it arrives (a bad schema is an InvalidRequest: a 400) and
  compiled on a background thread; the request waits outside the scheduler until it is ready, so
  a new schema never stalls the step loop. Compiled grammars are cached by spec.
- The matcher follows the tokens read back to the host. Under overlap scheduling the engine
  launches step N+1's forward first, reads step N back (advancing the matchers), then fills
  N+1's bitmask and launches its sampling: the host work overlaps the forward.
- A verify row j of a speculating request is masked by the state after its first j drafts; a
  draft the grammar refuses ends the rows that matter (the target cannot sample it there), and
  the matcher rolls back the drafts it took.
- With a reasoning parser, a request's grammar applies only after the end of its reasoning
  (the `</think>` token).
- JSON whitespace runs are capped here, not in the grammar (`WhitespaceCap`)."""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch

from lanner.config import StructuredOutputsConfig
from lanner.core.structured import StructuredOutputsParams
from lanner.errors import ConfigError, InvalidRequest

if TYPE_CHECKING:
    from lanner.core.request import Request

logger = logging.getLogger(__name__)

REASONING_TAGS = {"qwen3": ("<think>", "</think>"), "deepseek_r1": ("<think>", "</think>")}
# JSON allows any whitespace between tokens, and a model can get stuck emitting it; no pretty
# printer needs a longer run than this (a newline and 63 columns of indentation)
MAX_WHITESPACE_RUN = 64
JSON_WHITESPACE = b" \t\n\r"
MIN_BATCH_FILL = 16  # rows from which the threaded batch fill beats a loop (measured: docs/structured.md)


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:
        raise InvalidRequest(f"structured outputs need the 'xgrammar' package, which does not import ({e}): "
                             "pip install 'lanner[structured]'") from e
    return xgrammar


def parse(spec: StructuredOutputsParams) -> Any:
    """The spec as an xgrammar Grammar; what xgrammar cannot read is an InvalidRequest naming it."""
    xgr = _xgrammar()
    kind = spec.kind
    try:
        if kind in ("json", "json_object"):
            return xgr.Grammar.from_json_schema(spec.key[1] if kind == "json" else '{"type": "object"}',
                                                any_whitespace=not spec.disable_any_whitespace)
        if kind == "regex":
            return xgr.Grammar.from_regex(spec.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(_ebnf_string(c) for c in spec.choice))
        return xgr.Grammar.from_ebnf(spec.grammar)
    except (RuntimeError, ValueError, TypeError, RecursionError) as e:
        raise InvalidRequest(f"structured_outputs: xgrammar cannot use this {kind}: {_first_line(e)}") from None


def _ebnf_string(text: str) -> str:
    return '"' + "".join(c if c.isalnum() or c == " " else f"\\u{ord(c):04x}" if ord(c) < 0x10000
                         else f"\\U{ord(c):08x}" for c in text) + '"'


def _first_line(error: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source position."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text


class WhitespaceCap:
    """Ends runs of whitespace at MAX_WHITESPACE_RUN characters in JSON outputs: once a run is that
    long, the tokens made only of whitespace are masked out (the next token must carry content).
    xgrammar can bound the runs inside the grammar (max_whitespace_cnt), but that made every
    bitmask fill several times slower (docs/structured.md). The cap counts whitespace inside
    strings too: a JSON string cannot hold a run of more than about 64 spaces."""

    def __init__(self, decoded_vocab: list[bytes], vocab_size: int):
        self.only = [-1] * vocab_size  # a whitespace-only token's length; -1 for the others
        self.trailing = [0] * vocab_size  # the whitespace a token ends with
        allowed = torch.ones(1, vocab_size, dtype=torch.bool)
        for token, text in enumerate(decoded_vocab[:vocab_size]):
            text = bytes(text)
            content = text.rstrip(JSON_WHITESPACE)
            self.trailing[token] = len(text) - len(content)
            if text and not content:
                self.only[token] = len(text)
                allowed[0, token] = False
        self.allowed = _xgrammar().testing.bool_mask_to_bitmask(allowed)[0]

    def after(self, run: int, token: int) -> int:
        """The run of whitespace that ends the output once `token` follows a run of `run`."""
        length = self.only[token]
        return run + length if length >= 0 else self.trailing[token]

    def apply(self, bitmask: torch.Tensor, row: int, run: int) -> None:
        if run >= MAX_WHITESPACE_RUN:
            bitmask[row] &= self.allowed


class RequestGrammar:
    """One request's matcher: it has taken exactly the request's output tokens read back so far
    (those after its reasoning, with a reasoning parser)."""

    def __init__(self, compiled: Future, stop_token_ids: set[int], reasoning_end: int | None, capped: bool = False):
        self.compiled = compiled  # of (xgrammar's compiled grammar, the engine's WhitespaceCap)
        self.stop_token_ids = sorted(stop_token_ids)
        self.reasoning_end = reasoning_end  # None: the grammar applies from the first token
        self.matcher = None
        self.capped = capped  # JSON with any whitespace: runs are capped
        self.whitespace: WhitespaceCap | None = None  # the cap, once the matcher exists (when capped)
        self.whitespace_run = 0  # whitespace characters that end the output taken so far

    @property
    def ready(self) -> bool:
        return self.compiled.done()

    @property
    def active(self) -> bool:
        return self.reasoning_end is None

    def _matcher(self):
        if self.matcher is None:
            compiled, cap = self.compiled.result()
            # without stop tokens (ignore_eos), the request ends when the grammar does
            self.matcher = _xgrammar().GrammarMatcher(compiled, override_stop_tokens=self.stop_token_ids or None,
                                                      terminate_without_stop_token=not self.stop_token_ids)
            self.whitespace = cap if self.capped else None
        return self.matcher

    def accept(self, token: int) -> bool:
        """Advance by a token read back; False when the grammar refuses it."""
        if self.reasoning_end is not None:
            if token == self.reasoning_end:
                self.reasoning_end = None
            return True
        if not self._matcher().accept_token(token):
            return False
        self.whitespace_run = self._run_after(self.whitespace_run, token)
        return True

    def _run_after(self, run: int, token: int) -> int:
        return run if self.whitespace is None else self.whitespace.after(run, token)

    def cap(self, bitmask: torch.Tensor, row: int, run: int | None = None) -> None:
        """Mask out whitespace-only tokens in a row if the run before it reached the cap."""
        if self.whitespace is not None:
            self.whitespace.apply(bitmask, row, self.whitespace_run if run is None else run)

    @property
    def terminated(self) -> bool:
        return self.active and self._matcher().is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int, drafts: list[int]) -> None:
        """Rows row.. row+len(drafts): the masks after 0, 1, ... of the drafts (one request at a
        time: `Grammars.bitmask` fills the rows without drafts in one batch)."""
        matcher, taken, run = self._matcher(), 0, self.whitespace_run
        for j in range(len(drafts) + 1):
            if matcher.is_terminated():
                break
            matcher.fill_next_token_bitmask(bitmask, row + j)
            self.cap(bitmask, row + j, run)
            if j == len(drafts) or not matcher.accept_token(drafts[j]):
                break
            taken += 1
            run = self._run_after(run, drafts[j])
        if taken:
            matcher.rollback(taken)


class Grammars:
    """The engine's grammar compiler and cache (built at the first constrained request)."""

    def __init__(self, config: StructuredOutputsConfig, tokenizer: Any, vocab_size: int):
        xgr = _xgrammar()
        self.vocab_size = vocab_size
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="lanner-grammar")
        # the tokenizer's tables take most of a second for a 150k vocabulary: built on the grammar
        # thread, first in its queue (every compilation comes after), not on the step loop
        self.tables = self.pool.submit(self._tables, tokenizer, config.max_grammar_compile_threads)
        # fills a large step's rows on several threads, without the GIL (half the cores: the rest
        # run this process's other threads); a small step is faster on this thread
        self.batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, (os.cpu_count() or 2) // 2)))
        self.cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self.cache_size = config.grammar_cache_size
        self.reasoning = None
        if config.reasoning_parser is not None:
            start, end = (tokenizer.convert_tokens_to_ids(tag) for tag in REASONING_TAGS[config.reasoning_parser])
            if not all(isinstance(t, int) and t != tokenizer.unk_token_id for t in (start, end)):
                raise ConfigError(f"reasoning_parser {config.reasoning_parser}: the tokenizer has no single tokens "
                                  f"for {' and '.join(REASONING_TAGS[config.reasoning_parser])}")
            self.reasoning = (start, end)
        self.num_compiled = 0

    def start(self, req: Request, spec: StructuredOutputsParams, grammar: Any) -> None:
        """Give the request its matcher-to-be: a cached grammar, or one compiling now."""
        key = spec.key
        future = self.cache.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self.pool.submit(self._compile, grammar)
            self.cache[key] = future
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        self.cache.move_to_end(key)
        capped = spec.kind in ("json", "json_object") and not spec.disable_any_whitespace
        req.grammar = RequestGrammar(future, req.stop_token_ids, self._reasoning_end(req.prompt_token_ids), capped)

    def _tables(self, tokenizer: Any, threads: int) -> WhitespaceCap:
        xgr = _xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)  # cached here, by spec
        return WhitespaceCap(info.decoded_vocab, self.vocab_size)

    def _compile(self, grammar: Any) -> tuple[Any, WhitespaceCap]:
        cap = self.tables.result()  # done (it ran first on this thread), or its own error
        compiled = self.compiler.compile_grammar(grammar)
        self.num_compiled += 1
        return compiled, cap

    def _reasoning_end(self, prompt: list[int]) -> int | None:
        """The token that ends the request's reasoning, or None when it has none to do (no reasoning
        parser, or the prompt already closed it, as Qwen3's template does with thinking off)."""
        if self.reasoning is None:
            return None
        start, end = self.reasoning
        last = {t: i for i, t in enumerate(prompt) if t in (start, end)}
        return None if last.get(end, -1) > last.get(start, -1) else end

    def bitmask(self, rows: list[tuple[Request, int, list[int]]]) -> tuple[torch.Tensor, list[int]] | None:
        """(bitmask [rows, words] on the host, the sampler rows it covers) for constrained requests
        given as (request, first sampler row, drafts it verifies); None when none is constrained."""
        rows = [(req, row, drafts) for req, row, drafts in rows if req.grammar.active and not req.finished]
        if not rows:
            return None
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(sum(1 + len(d) for _, _, d in rows), self.vocab_size)
        covered, at, batch, batch_rows = [], 0, [], []
        for req, row, drafts in rows:
            if drafts:
                req.grammar.fill(bitmask, at, drafts)
            elif not req.grammar.terminated:  # (a request that ended stays unmasked: its token is dropped)
                batch.append(req.grammar)
                batch_rows.append(at)
            covered += range(row, row + 1 + len(drafts))
            at += 1 + len(drafts)
        if len(batch) >= MIN_BATCH_FILL:
            self.batch.batch_fill_next_token_bitmask([g.matcher for g in batch], bitmask, batch_rows)
        else:
            for grammar, at in zip(batch, batch_rows):
                grammar.matcher.fill_next_token_bitmask(bitmask, at)
        for grammar, at in zip(batch, batch_rows):
            grammar.cap(bitmask, at)
        return bitmask, covered
