"""GET /metrics: the server's request counters, the pager's figures and, for a remote model, its store's, in
Prometheus text format, read at scrape time from the engine's totals, the pager's own stats (pager/stats.py) and the
store's (remote/store.py StoreStats)."""

from collections.abc import Iterator
from dataclasses import replace

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ..remote.store import StoreStats
from .engine import Engine


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"expertpager_{name}", doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"expertpager_{name}", doc, value=value)


class EngineCollector:
    """A prometheus_client collector over one Engine."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        e = self.engine
        with e.lock:
            t = replace(e.totals, requests=dict(e.totals.requests))
        requests = CounterMetricFamily("expertpager_requests", "Requests by endpoint and outcome "
                                       "(stop, length, cancelled, error, invalid, rejected, unavailable).",
                                       labels=["endpoint", "outcome"])
        for (endpoint, outcome), n in sorted(t.requests.items()):
            requests.add_metric([endpoint, outcome], n)
        yield requests
        yield _counter("prompt_tokens", "Prompt tokens processed.", t.prompt_tokens)
        yield _counter("generated_tokens", "Tokens generated.", t.completion_tokens)
        yield _counter("prefill_seconds", "Seconds spent on prompts.", t.prefill_seconds)
        yield _counter("decode_seconds", "Seconds spent generating after the first token.", t.decode_seconds)
        yield _gauge("decode_tokens_per_second", "Decode speed of the last request.", t.last_decode_tokens_per_s)
        yield _gauge("decode_tokens_per_second_average", "Decode speed over all requests.",
                     t.decode_tokens / t.decode_seconds if t.decode_seconds else 0.0)
        yield _gauge("queue_waiting", "Requests waiting for the model.", e.jobs.qsize())
        yield _gauge("requests_running", "Requests being generated now (0 or 1).", 0.0 if e.running is None else 1.0)
        yield _gauge("model_loaded", "1 once the model is loaded.", 1.0 if e.ready.is_set() else 0.0)
        if e.ready.is_set():
            yield from self._pager()
            if e.model.store is not None:
                yield from _store(e.model.store.stats())

    def _pager(self) -> Iterator[Metric]:
        model = self.engine.model
        pager = model.pager
        s = pager.stats_snapshot()
        held = pager.occupancy()
        yield _gauge("cache_hit_rate", "Pins served from the cache without waiting, since start.", s.hit_rate)
        yield _gauge("cache_prefetch_hit_rate", "Prefetched slices that a pin used, since start.", s.prefetch_hit_rate)
        pins = CounterMetricFamily("expertpager_cache_pins", "Slice pins: hit (resident), join (load in flight), "
                                   "miss (started a load).", labels=["result"])
        for result, n in (("hit", s.hits), ("join", s.joins), ("miss", s.misses)):
            pins.add_metric([result], n)
        yield pins
        yield _counter("cache_prefetches", "Prefetches issued.", s.prefetch_issued)
        yield _counter("cache_read_bytes", "Slice bytes read from storage.", s.bytes_read)
        yield _counter("cache_stall_seconds", "Seconds the model waited for slices.", s.stall_seconds)
        yield _counter("cache_evictions", "Slices evicted.", s.evictions)
        yield _gauge("cache_used_bytes", "Bytes of the cache's slots holding a slice now.", sum(b for b, _ in held.values()))
        yield _gauge("cache_pool_bytes", "Bytes allocated for the cache (slots and staging).", pager.pool_bytes)
        yield _gauge("cache_budget_bytes", "The cache's byte budget.", model.memory_plan.cache_bytes)
        yield _gauge("cache_slices", "Slices held now.", len(held))
        layers = GaugeMetricFamily("expertpager_cache_layer_hit_rate", "Hit rate per MoE layer, since start.",
                                   labels=["layer"])
        for layer, c in sorted(s.per_layer.items()):
            layers.add_metric([str(layer)], c.hit_rate)
        yield layers


def _store(s: StoreStats) -> Iterator[Metric]:
    yield _gauge("store_hit_rate", "Slice lookups the local store answered from disk, since start.", s.hit_rate)
    lookups = CounterMetricFamily("expertpager_store_lookups", "Slice lookups in the local store: hit (on disk), "
                                  "miss (fetched remotely).", labels=["result"])
    for result, n in (("hit", s.hits), ("miss", s.misses)):
        lookups.add_metric([result], n)
    yield lookups
    yield _counter("store_evictions", "Slices deleted from the store to keep its disk budget.", s.evictions)
    yield _counter("remote_fetched_bytes", "Bytes fetched from the remote checkpoint (slices, headers, resident).",
                   s.remote_bytes)
    yield _counter("remote_fetch_seconds", "Seconds spent in remote requests, summed over threads.", s.remote_seconds)
    yield _counter("remote_requests", "Range requests to the remote checkpoint.", s.remote_requests)
    yield _counter("remote_retries", "Range requests retried after a fault.", s.remote_retries)
    yield _gauge("store_bytes", "Bytes the store takes on disk (headers, resident tensors, slices).", s.store_bytes)
    if s.disk_budget is not None:
        yield _gauge("store_budget_bytes", "The store's disk budget.", s.disk_budget)


def render(engine: Engine) -> bytes:
    """The Prometheus text exposition of `engine`."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine))
    return generate_latest(registry)
