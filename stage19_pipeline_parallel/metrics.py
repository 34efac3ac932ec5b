"""What ``GET /metrics`` reports, in Prometheus' text format.

Two sources feed it: the engine's counts, which arrive with every update
batch (``Engine.stats``: requests running and waiting, KV pages by use,
tokens generated, and with speculative decoding the verify forwards and
the tokens they gave; stage 17: what each tier of the hierarchical cache
served and moved), and each finished request's output (prompt, cached and
generated tokens, latencies). Names follow SGLang's ``sglang:*`` metrics
with a ``ladder:`` prefix, so existing dashboards need only a rename.
"""

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .request import GenerateOutput

THROUGHPUT_WINDOW_S = 10.0  # tokens per second are averaged over this many seconds
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    """Prometheus collectors for one server, in a registry of their own."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.num_running_reqs = Gauge("ladder:num_running_reqs", "Requests in the running batch", registry=registry)
        self.num_queue_reqs = Gauge("ladder:num_queue_reqs", "Requests waiting to be scheduled", registry=registry)
        self.kv_pages_total = Gauge("ladder:kv_pages_total", "Pages in the KV pool", registry=registry)
        self.kv_pages_used = Gauge("ladder:kv_pages_used", "KV pages held by running requests", registry=registry)
        self.kv_pages_cached = Gauge(
            "ladder:kv_pages_cached", "KV pages held only by the prefix cache (evictable)", registry=registry
        )
        self.token_usage = Gauge("ladder:token_usage", "Fraction of KV pages held by running requests", registry=registry)
        self.gen_throughput = Gauge(
            "ladder:gen_throughput", f"Generated tokens per second over the last {THROUGHPUT_WINDOW_S:g} s", registry=registry
        )
        self.cache_hit_rate = Gauge(
            "ladder:cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens, since start",
            registry=registry,
        )
        self.spec_accept_length = Gauge(
            "ladder:spec_accept_length", "Tokens a request gains per verify forward (accepted guesses + 1), since start",
            registry=registry,
        )
        # Stage 17: the hierarchical cache's tiers (engine totals since it started; zero when it is off).
        self.hicache_hit_tokens = Gauge("ladder:hicache_hit_tokens", "Admitted prompt tokens found on each tier",
                                        ["tier"], registry=registry)
        self.hicache_bytes = Gauge("ladder:hicache_bytes", "Bytes moved: loaded (to the device), written (device to "
                                   "host), stored (host to files)", ["direction"], registry=registry)
        self.hicache_load_seconds = Gauge("ladder:hicache_load_seconds", "Host time spent issuing loads back to the "
                                          "device (file reads included)", registry=registry)
        self.hicache_host_pages = Gauge("ladder:hicache_host_pages", "Pages of the host tier: total and used", ["use"],
                                        registry=registry)
        self.hicache_bad_files = Gauge("ladder:hicache_bad_files", "Files of the file tier found missing, short or "
                                       "altered (each prefix computed again)", registry=registry)
        # Stage 18: handovers (SGLang's queue names), on the engine of each role.
        self.prefill_inflight = Gauge("ladder:num_prefill_inflight_queue_reqs", "Handovers whose K/V this prefill "
                                      "engine holds, not yet sent", registry=registry)
        self.decode_prealloc = Gauge("ladder:num_decode_prealloc_queue_reqs", "Handovers waiting for pages to reserve",
                                     registry=registry)
        self.decode_transfer = Gauge("ladder:num_decode_transfer_queue_reqs", "Handovers with pages reserved, their "
                                     "K/V on the way", registry=registry)
        self.handovers = Gauge("ladder:handovers", "Handovers ended, done or failed (since start)", ["state"],
                               registry=registry)
        self.kv_transfer_speed = Gauge("ladder:kv_transfer_speed_gb_s", "K/V bytes received / seconds their payloads "
                                       "took (since start)", registry=registry)
        self.kv_transfer_latency = Gauge("ladder:kv_transfer_latency_ms", "Mean time from pages reserved to K/V "
                                         "placed (since start)", registry=registry)
        self.prompt_tokens = Counter("ladder:prompt_tokens", "Prompt tokens of finished requests", registry=registry)
        self.cached_tokens = Counter("ladder:cached_tokens", "Prompt tokens served from the prefix cache", registry=registry)
        self.generation_tokens = Counter("ladder:generation_tokens", "Tokens generated", registry=registry)
        self.num_requests = Counter(
            "ladder:num_requests", "Finished requests by finish reason", ["finish_reason"], registry=registry
        )
        self.time_to_first_token = Histogram(
            "ladder:time_to_first_token_seconds", "Arrival in the engine to the first token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.e2e_request_latency = Histogram(
            "ladder:e2e_request_latency_seconds", "Arrival in the engine to the last token", buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.gen_throughput.set_function(self._throughput)
        self.cache_hit_rate.set_function(lambda: self._cached / self._prompt if self._prompt else 0.0)
        self._prompt = self._cached = 0
        self._generated: deque[tuple[float, int]] = deque()  # (time, tokens generated so far), oldest first
        self._generated_before = 0  # tokens of engine processes that died (a new one counts from zero)

    def observe_stats(self, stats: dict[str, int]) -> None:
        """The engine's counts, sent with every update batch."""
        if not stats:
            return
        self.num_running_reqs.set(stats["running"])
        self.num_queue_reqs.set(stats["waiting"])
        self.kv_pages_total.set(stats["pages_total"])
        self.kv_pages_used.set(stats["pages_used"])
        self.kv_pages_cached.set(stats["pages_cached"])
        self.token_usage.set(stats["pages_used"] / max(stats["pages_total"], 1))
        if stats["spec_verify_ct"]:
            self.spec_accept_length.set(stats["spec_tokens"] / stats["spec_verify_ct"])
        if "hicache_host_pages_total" in stats:
            self._observe_hicache(stats)
        self.prefill_inflight.set(stats.get("prefill_inflight", 0))
        if "decode_prealloc" in stats:
            self._observe_handovers(stats)
        generated = stats["generated_tokens"] + self._generated_before
        self.generation_tokens.inc(generated - (self._generated[-1][1] if self._generated else 0))
        self._generated.append((time.monotonic(), generated))
        self._forget_before(time.monotonic() - THROUGHPUT_WINDOW_S)

    def _observe_hicache(self, stats: dict) -> None:
        for tier in ("device", "host", "disk"):
            self.hicache_hit_tokens.labels(tier).set(stats[f"hicache_{tier}_hit_tokens"])
        for direction in ("loaded", "written", "stored"):
            self.hicache_bytes.labels(direction).set(stats[f"hicache_bytes_{direction}"])
        self.hicache_load_seconds.set(stats["hicache_load_seconds"])
        self.hicache_host_pages.labels("total").set(stats["hicache_host_pages_total"])
        self.hicache_host_pages.labels("used").set(stats["hicache_host_pages_used"])
        self.hicache_bad_files.set(stats["hicache_bad_files"])

    def _observe_handovers(self, stats: dict) -> None:
        self.decode_prealloc.set(stats["decode_prealloc"])
        self.decode_transfer.set(stats["decode_transfer"])
        self.handovers.labels("done").set(stats["handovers_done"])
        self.handovers.labels("failed").set(stats["handovers_failed"])
        if stats["kv_transfer_seconds"]:
            self.kv_transfer_speed.set(stats["kv_transfer_bytes"] / stats["kv_transfer_seconds"] / 1e9)
        if stats["handovers_done"]:
            self.kv_transfer_latency.set(1e3 * stats["handover_seconds"] / stats["handovers_done"])

    def engine_restarted(self) -> None:
        """A new engine process counts from zero: the old one's tokens stay counted."""
        self._generated_before = self._generated[-1][1] if self._generated else 0

    def observe_finished(self, output: GenerateOutput) -> None:
        self._prompt += output.prompt_tokens
        self._cached += output.cached_tokens
        self.prompt_tokens.inc(output.prompt_tokens)
        self.cached_tokens.inc(output.cached_tokens)
        self.num_requests.labels(output.finish_reason).inc()
        if output.token_times:
            self.time_to_first_token.observe(output.token_times[0] - output.arrival_time)
            self.e2e_request_latency.observe(output.token_times[-1] - output.arrival_time)

    def _forget_before(self, start: float) -> None:
        """Drop samples older than ``start``, keeping the last one before it (the window's baseline)."""
        while len(self._generated) > 1 and self._generated[1][0] <= start:
            self._generated.popleft()

    def _throughput(self) -> float:
        """Tokens generated within the last window, per second (falls to 0 once the engine idles)."""
        now = time.monotonic()
        self._forget_before(now - THROUGHPUT_WINDOW_S)
        if not self._generated:
            return 0.0
        start_time, start_count = self._generated[0]
        elapsed = min(now - start_time, THROUGHPUT_WINDOW_S)
        return (self._generated[-1][1] - start_count) / elapsed if elapsed > 0 else 0.0

    def render(self) -> bytes:
        return generate_latest(self.registry)
