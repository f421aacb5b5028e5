"""Prometheus metrics of one server (its own registry, so tests can run several)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from lanner.core.request import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("lanner_http_requests", "HTTP requests by endpoint and status code",
                                     ["endpoint", "status"], registry=r)
        self.finished = Counter("lanner_requests_finished", "generation requests finished, by finish reason",
                                ["reason"], registry=r)
        self.ttft = Histogram("lanner_time_to_first_token_seconds",
                              "the server receiving a request to the engine producing its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("lanner_time_per_output_token_seconds", "mean time between output tokens of a request",
                              buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("lanner_e2e_request_latency_seconds",
                             "the server receiving a request to its last output reaching the server",
                             buckets=LATENCY_BUCKETS, registry=r)
        # e2e = handoff + queue + inference + the way back (engine process -> server)
        self.handoff = Histogram("lanner_request_handoff_seconds", "the server receiving a request to the engine "
                                 "queuing it (the pipe to the engine process, a step in progress)",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("lanner_request_queue_time_seconds", "the engine queuing a request to first "
                               "scheduling it", buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("lanner_request_inference_time_seconds", "first scheduled to the last token",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lanner_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("lanner_generation_tokens", "output tokens of finished requests",
                                         registry=r)
        self.running = Gauge("lanner_num_requests_running", "sequences in the running batch", registry=r)
        self.waiting = Gauge("lanner_num_requests_waiting", "sequences waiting to be scheduled", registry=r)
        self.kv_usage = Gauge("lanner_kv_cache_usage", "fraction of KV-cache blocks in use", registry=r)
        self.prefix_hit_rate = Gauge("lanner_prefix_cache_hit_rate", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.preemptions = Gauge("lanner_num_preemptions", "preemptions since start", registry=r)
        self.totals = _EngineTotals()  # the engine's totals, exported as they are
        r.register(self.totals)

    def record_stats(self, stats) -> None:
        """An EngineStats sample (the engine loop sends one every 0.25 s or so while it steps)."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_usage)
        self.prefix_hit_rate.set(stats.prefix_hit_rate)
        self.preemptions.set(stats.preemptions)
        t = self.totals
        t.steps, t.tokens_computed, t.step_seconds, t.between_steps_seconds = \
            stats.steps, stats.tokens_computed, stats.step_seconds, stats.between_steps_seconds
        if stats.speculation is not None:
            self.totals.speculation = stats.speculation

    def record_dead(self, message: str) -> None:
        """The engine stopped: every request was failed, no blocks are in use."""
        self.running.set(0)
        self.waiting.set(0)
        self.kv_usage.set(0)

    def record_finished(self, out: RequestOutput, received: float | None = None,
                        delivered: float | None = None) -> None:
        """A finished output of any output_kind (counts come from its metrics, not its lists,
        which a DELTA output holds only the end of). `received`, `delivered`: the server's
        time.monotonic() of the request's arrival and of its last output's (the engine's times are
        on the same clock, in its process too; a request that streams nothing sends no first output,
        so TTFT ends at the engine's first token); without them TTFT and e2e count from the engine
        queuing the request."""
        m = out.metrics
        for choice in out.outputs:
            self.finished.labels(choice.finish_reason or "unknown").inc()
        if m is None:
            return
        lengths = m.output_lengths or [0]
        self.generation_tokens.inc(sum(lengths))
        self.prompt_tokens.inc(m.num_prompt_tokens)
        if m.first_token_time is None or m.finished_time is None:
            return
        if received is None or delivered is None:
            received, delivered = m.arrival_time, m.finished_time
        else:
            self.handoff.observe(max(m.arrival_time - received, 0.0))
        self.ttft.observe(m.first_token_time - received)
        self.e2e.observe(delivered - received)
        if m.first_scheduled_time is not None:
            self.queue.observe(m.first_scheduled_time - m.arrival_time)
            self.inference.observe(m.finished_time - m.first_scheduled_time)
        if max(lengths) > 1:
            self.tpot.observe((m.finished_time - m.first_token_time) / (max(lengths) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineTotals:
    """Counters the engine keeps itself (steps, tokens through the model, speculative decoding's
    SpeculationStats.as_dict()): exported as the latest sample says, with no counting of our own."""

    def __init__(self) -> None:
        self.steps = self.tokens_computed = 0
        self.step_seconds = self.between_steps_seconds = 0.0
        self.speculation: dict | None = None  # none until an engine that speculates reports

    def collect(self):
        # tokens computed / steps is the mean batch of a step: a burst served in more, smaller
        # steps than offline shows here
        yield CounterMetricFamily("lanner_engine_steps", "engine steps (forward passes of the batch)",
                                  value=self.steps)
        yield CounterMetricFamily("lanner_engine_tokens_computed", "tokens through the model: prompt chunks, "
                                  "decoded tokens and drafts verified", value=self.tokens_computed)
        # a burst's step seconds against offline's wall time: are the steps slower when served? Its
        # between-steps seconds: how long the loop spent on commands and outputs between them
        yield CounterMetricFamily("lanner_engine_step_seconds", "wall time inside engine steps",
                                  value=self.step_seconds)
        yield CounterMetricFamily("lanner_engine_between_steps_seconds", "wall time between engine steps while "
                                  "requests were unfinished (commands, outputs)", value=self.between_steps_seconds)
        t = self.speculation
        if t is None:
            return
        for name, key, doc in (("draft_tokens", "spec_draft_tokens", "draft tokens verified"),
                               ("accepted_tokens", "spec_accepted_tokens", "draft tokens accepted"),
                               ("verifications", "spec_verifications", "request-steps that verified drafts")):
            yield CounterMetricFamily(f"lanner_spec_decode_{name}", doc, value=t[key])
        per_position = CounterMetricFamily("lanner_spec_decode_accepted_tokens_per_pos",
                                           "draft tokens accepted, by draft position (0: the first)",
                                           labels=["position"])
        for position, count in enumerate(t["spec_accepted_per_position"]):
            per_position.add_metric([str(position)], count)
        yield per_position
