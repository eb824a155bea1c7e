"""Prometheus metrics under TGI's names and labels (`/metrics`), in a registry of their own."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# TGI's duration buckets: 0.00015 s growing by 1.5x, 35 of them.
DURATION_BUCKETS = [0.00015 * 1.5**k for k in range(35)]


def _linear(stop: int, count: int = 100) -> list[float]:
    return [stop * (i + 1) / count for i in range(count)]


class Metrics:
    def __init__(self, max_input_tokens: int, max_total_tokens: int, max_batch_total_tokens: int):
        self.registry = registry = CollectorRegistry()

        def histogram(name, doc, buckets=DURATION_BUCKETS, labels=()):
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        def counter(name, doc, labels=()):
            return Counter(name, doc, labels, registry=registry)

        def gauge(name, doc):
            return Gauge(name, doc, registry=registry)

        self.request_count = counter("tgi_request_count", "Requests received")
        self.request_success = counter("tgi_request_success", "Requests that succeeded")
        self.request_failure = counter("tgi_request_failure", "Requests that failed", ["err"])
        self.request_duration = histogram("tgi_request_duration", "End-to-end request time (s)")
        self.validation_duration = histogram("tgi_request_validation_duration", "Validation time (s)")
        self.queue_duration = histogram("tgi_request_queue_duration", "Time queued before batching (s)")
        self.inference_duration = histogram("tgi_request_inference_duration", "Time from batching to the end (s)")
        self.time_per_token = histogram("tgi_request_mean_time_per_token_duration", "Inference time per token (s)")
        self.generated_tokens = histogram("tgi_request_generated_tokens", "Tokens generated", _linear(max_total_tokens))
        self.input_length = histogram("tgi_request_input_length", "Prompt tokens", _linear(max_input_tokens))
        self.max_new_tokens = histogram("tgi_request_max_new_tokens", "max_new_tokens", _linear(max_total_tokens))
        self.preemptions = counter("tgi_request_preemption", "Requests preempted: KV blocks freed, recomputed later")
        self.prompt_tokens_cached = counter(
            "tgi_request_prompt_tokens_cached", "Known tokens of admitted requests whose KV came from the prefix cache")
        self.prompt_tokens_computed = counter(
            "tgi_request_prompt_tokens_computed", "Known tokens of admitted requests that the shards computed")
        self.prefix_cache_hit_rate = gauge(
            "tgi_prefix_cache_hit_rate", "Share of admitted requests' known tokens served by the prefix cache")
        self.prefix_cache_free_blocks = gauge(
            "tgi_prefix_cache_free_blocks", "KV blocks no request uses that keep a cached prefix (evicted when needed)")
        self.speculative_proposed = counter(
            "tgi_speculative_proposed_tokens", "Tokens proposed by speculative decoding, by position after the last known token", ["position"])
        self.speculative_accepted = counter(
            "tgi_speculative_accepted_tokens", "Proposed tokens the shards accepted, by position (accepted / proposed: the rate)", ["position"])
        self.queue_size = gauge("tgi_queue_size", "Requests waiting")
        self.batch_size = gauge("tgi_batch_current_size", "Requests in the running batch")
        self.batch_max_tokens = gauge("tgi_batch_current_max_tokens", "KV tokens held by the batch")
        gauge("tgi_batch_max_total_tokens", "KV cache size in tokens").set(max_batch_total_tokens)
        self.batch_next_size = histogram("tgi_batch_next_size", "Requests joining per step", [2**i for i in range(11)])
        self.step_count = counter("tgi_batch_inference_count", "Steps run", ["method"])
        self.step_success = counter("tgi_batch_inference_success", "Steps that succeeded", ["method"])
        self.step_failure = counter("tgi_batch_inference_failure", "Steps that failed", ["method"])
        self.step_duration = histogram("tgi_batch_inference_duration", "Step round trip (s)", labels=["method"])
        self.forward_duration = histogram("tgi_batch_forward_duration", "Shard forward time (s)", labels=["method"])
        # Data-parallel replicas (one without --data-parallel-size): each one's load; the gauges above are sums.
        self.replica_requests = Gauge("tgi_replica_requests", "Requests waiting or running, by data-parallel replica",
                                      ["replica"], registry=registry)
        self.replica_steps = counter("tgi_replica_inference_count", "Steps run, by data-parallel replica", ["replica"])
        self._replica_batches: dict[int, tuple[int, int, int, int]] = {}
        self._num_cached = self._num_computed = 0

    def observe_batch(self, replica: int, num_waiting: int, num_running: int, num_kv_tokens: int,
                      num_cached_free_blocks: int) -> None:
        """One replica's queue, batch and KV cache as they are now; the TGI gauges show the sum."""
        self._replica_batches[replica] = (num_waiting, num_running, num_kv_tokens, num_cached_free_blocks)
        waiting, running, kv_tokens, cached_free = (sum(values) for values in zip(*self._replica_batches.values()))
        self.queue_size.set(waiting)
        self.batch_size.set(running)
        self.batch_max_tokens.set(kv_tokens)
        self.prefix_cache_free_blocks.set(cached_free)
        self.replica_requests.labels(str(replica)).set(num_waiting + num_running)

    def count_prompt_tokens(self, num_cached: int, num_computed: int) -> None:
        """Admitted requests' known tokens, from the prefix cache or computed; the hit rate over all of them."""
        self.prompt_tokens_cached.inc(num_cached)
        self.prompt_tokens_computed.inc(num_computed)
        self._num_cached += num_cached
        self._num_computed += num_computed
        if self._num_cached + self._num_computed:
            self.prefix_cache_hit_rate.set(self._num_cached / (self._num_cached + self._num_computed))

    def render(self) -> bytes:
        return generate_latest(self.registry)
