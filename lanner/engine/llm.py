"""The offline API, with vLLM's names: LLM(model=...).generate(...) / .chat(...)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

from tqdm.auto import tqdm

from lanner.config import EngineConfig
from lanner.core.request import RequestOutput, RequestOutputKind, SamplingParams
from lanner.engine.engine import LLMEngine, PromptType
from lanner.errors import InvalidRequest


class LLM:
    def __init__(self, model: str | None = None, **engine_args: Any):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **engine_args))
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The model's recommended settings (its generation_config.json), as used when
        generate() gets no sampling_params."""
        return self.engine.default_sampling_params()

    def get_metrics(self) -> dict[str, Any]:
        """Counters since the engine started: steps, tokens through the model and generated,
        preemptions, prefix-cache hits, and with speculative decoding its drafts and acceptance."""
        e = self.engine
        kv = e.kv_cache.stats()
        out = {"num_steps": e.num_steps, "num_tokens_computed": e.num_tokens_computed,
               "num_tokens_generated": e.num_tokens_generated, "num_preemptions": e.scheduler.num_preemptions,
               "prefix_cache_queries": kv.prefix_queries, "prefix_cache_hits": kv.prefix_hits}
        if e.speculator is not None:
            out.update(e.speculator.stats.as_dict())
        return out

    def reset_prefix_cache(self) -> bool:
        """Forget the cached prefixes; False while requests still hold KV blocks."""
        return self.engine.kv_cache.reset_prefix_cache()

    def generate(self, prompts: PromptType | list[PromptType],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for one prompt or many (strings or token id lists); outputs keep the input order.
        Without sampling_params, the model's generation_config.json settings apply.
        All prompts are validated before any runs, so one bad prompt fails the call cleanly."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise InvalidRequest(f"prompts must be a string, token ids, a prompt dict or a list of them, "
                                 f"got {type(prompts).__name__}")
        params = sampling_params if sampling_params is not None else self.engine.default_sampling_params()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequest(f"{len(prompts)} prompts but {len(params)} sampling params")
        if not all(isinstance(p, SamplingParams) for p in params):
            raise InvalidRequest("sampling_params must be SamplingParams (from a dict: SamplingParams(**d))")
        # only the finished outputs are returned: the engine builds nothing else (as vLLM's LLM)
        final_only = {id(p): dataclasses.replace(p, output_kind=RequestOutputKind.FINAL_ONLY) for p in params}
        return self._run([(prompt, final_only[id(p)]) for prompt, p in zip(prompts, params)], use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, chat_template: str | None = None, add_generation_prompt: bool = True,
             continue_final_message: bool = False, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of OpenAI-style messages: role, content as a string or
        text parts, tool_calls, tool_call_id) or many, rendered with the chat template
        (`chat_template` overrides the tokenizer's). `continue_final_message` continues the
        last (assistant) message instead of starting a new one; `tools` are shown to the
        template, as in vLLM (tool calls in the output are not parsed)."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                       chat_template=chat_template, tools=tools, chat_template_kwargs=chat_template_kwargs)
        prompts = []
        for conversation in conversations:
            ids = self.engine.render_chat(conversation, **options)
            prompts.append({"prompt_token_ids": ids, "prompt": self.engine.prompts.decode(ids)})
        return self.generate(prompts, sampling_params, use_tqdm)

    def _run(self, work: list[tuple[PromptType, SamplingParams]], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.engine
        ids = [f"offline-{next(self._ids)}" for _ in work]
        try:
            for request_id, (prompt, params) in zip(ids, work):
                engine.add_request(request_id, prompt, params)
        except Exception:
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        try:
            with tqdm(total=len(ids), desc="generate", disable=not use_tqdm or len(ids) < 2, unit="req") as bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
        except BaseException:  # Ctrl-C, or an error in a step: this call's requests must not run on in the next
            engine.fail_step()
            for request_id in ids:
                engine.abort_request(request_id)
            raise
        return [done[i] for i in ids]
