"""The server's Prometheus metrics (prometheus-client, a registry of its own per server).

Read from the engine when scraped: requests running and waiting, KV-cache blocks used and usable,
prompt and generated token counters. Observed by the server as each request finishes: time to first
token and time per output token histograms, and finished requests by finish reason.
"""
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    """Gauges and counters read from the engine at scrape time (none while the model loads)."""

    def __init__(self, state):
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        yield GaugeMetricFamily("fuselm:num_requests_running", "Requests with KV blocks in the engine",
                                value=engine.num_running)
        yield GaugeMetricFamily("fuselm:num_requests_waiting", "Requests queued for admission",
                                value=engine.num_waiting)
        blocks = engine.blocks
        yield GaugeMetricFamily("fuselm:kv_cache_blocks_used", "KV-cache blocks referenced by requests",
                                value=blocks.usable - blocks.num_free)
        yield GaugeMetricFamily("fuselm:kv_cache_blocks_total", "KV-cache blocks in the pool", value=blocks.usable)
        yield GaugeMetricFamily("fuselm:kv_cache_usage_perc", "Share of the KV-cache blocks in use",
                                value=(blocks.usable - blocks.num_free) / blocks.usable)
        stats = engine.stats
        yield CounterMetricFamily("fuselm:prompt_tokens", "Prompt tokens of finished requests",
                                  value=stats["prompt_tokens"])
        yield CounterMetricFamily("fuselm:prompt_tokens_cached", "Prompt tokens served from the prefix cache",
                                  value=stats["cached_tokens"])
        yield CounterMetricFamily("fuselm:generation_tokens", "Generated tokens", value=stats["generated_tokens"])
        yield CounterMetricFamily("fuselm:num_preemptions", "Requests preempted (recomputed later)",
                                  value=stats["preemptions"])


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, state):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(state))
        self.ttft = Histogram("fuselm:time_to_first_token_seconds", "Time from arrival to the first token",
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram("fuselm:time_per_output_token_seconds", "Time between consecutive output tokens",
                              buckets=_TPOT_BUCKETS, registry=self.registry)
        self.finished = Counter("fuselm:request_success", "Finished requests by finish reason", ["finished_reason"],
                                registry=self.registry)

    def observe(self, completion):
        """A finished engine request (a Completion)."""
        self.finished.labels(completion.finish_reason.value).inc()
        if completion.time_to_first_token is not None:
            self.ttft.observe(completion.time_to_first_token)
        for dt in completion.token_times:
            self.tpot.observe(dt)

    def render(self):
        return generate_latest(self.registry)
