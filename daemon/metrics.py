"""GET /metrics: Prometheus' text format, through prometheus_client.

Two kinds of figures:
- what this node's APIs saw, counted as requests pass (serving.py): time to
  first token and between tokens, tokens generated, requests by API, model
  and outcome;
- what the cluster view says at the moment of the scrape (a collector over
  node.view): per instance its queue, batch, batch bound and prefix cache
  (per rank: each rank caches its own shard), per node its memory, per rank
  its state. Every node exposes the whole cluster's view; the API counters
  are this node's own.

Each daemon has its own registry (tests run several daemons in one
process), never prometheus_client's global one."""

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from exod.proto import exod_pb2 as pb

from . import state

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds; a first token waits for a prefill (up to many seconds on a CPU),
# the gaps between tokens are milliseconds.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)
RUNNER_STATES = {v: k.lower() for k, v in pb.RunnerState.items() if v}
OUTCOMES = ("stop", "length", "cancelled", "error", "invalid", "context_length", "overloaded", "not_found")


class Metrics:
    def __init__(self, node):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("exod_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["model"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("exod_inter_token_latency_seconds", "Between consecutive tokens of one answer",
                             ["model"], buckets=ITL_BUCKETS, registry=self.registry)
        self.tokens = Counter("exod_generated_tokens", "Tokens generated for this node's API clients",
                              ["model"], registry=self.registry)
        self.prompt_tokens = Counter("exod_prompt_tokens", "Prompt tokens of this node's API requests",
                                     ["model"], registry=self.registry)
        self.cached_tokens = Counter("exod_prompt_cached_tokens",
                                     "Prompt tokens whose KV came from the prefix cache", ["model"],
                                     registry=self.registry)
        self.requests = Counter("exod_requests", "Generation requests by API, model and outcome",
                                ["api", "model", "outcome"], registry=self.registry)
        self.registry.register(_ViewCollector(node))

    def text(self) -> bytes:
        return generate_latest(self.registry)


class _ViewCollector:
    """Gauges read from the cluster view at scrape time."""

    def __init__(self, node):
        self.node = node

    def describe(self):
        return []  # families depend on the view; nothing to check at registration

    def collect(self):
        view = self.node.view
        g = {name: GaugeMetricFamily(name, text, labels=labels) for name, text, labels in (
            ("exod_instance_queue_depth", "Admitted requests waiting for the batch (rank 0)",
             ["instance", "model"]),
            ("exod_instance_batch_size", "Sequences in the running batch", ["instance", "model"]),
            ("exod_instance_max_batch", "The batch bound: the placement's concurrency", ["instance", "model"]),
            ("exod_instance_tokens_per_second", "Generated tokens per second, recent (rank 0)",
             ["instance", "model"]),
            ("exod_prefix_cache_bytes", "KV bytes the prefix cache holds on a rank", ["instance", "model", "rank"]),
            ("exod_prefix_cache_capacity_bytes", "Bytes reserved for the prefix cache on a rank",
             ["instance", "model", "rank"]),
            ("exod_prefix_cache_tokens", "Tokens the prefix cache holds (the same on every rank)",
             ["instance", "model", "rank"]),
            ("exod_node_memory_usable_bytes", "Memory exod may plan onto", ["node"]),
            ("exod_node_memory_reserved_bytes", "Memory held by placements", ["node"]),
            ("exod_node_memory_used_bytes", "Memory in use on the machine (total less available)", ["node"]),
            ("exod_runner_state", "1 for the state each rank is in", ["instance", "model", "rank", "node", "state"]),
        )}
        # Rank 0's running totals since the instance started: counters (a
        # rate() over them is the hit rate), exposed as `…_total`.
        g.update({name: CounterMetricFamily(name, text, labels=["instance", "model"]) for name, text in (
            ("exod_prefix_cache_lookups", "Requests that looked for a cached prefix"),
            ("exod_prefix_cache_hits", "Requests that reused a cached prefix"),
            ("exod_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
        )})
        for member in view.members.values():
            profile = member.record.profile
            name = profile.name or profile.node_id[:12]
            g["exod_node_memory_usable_bytes"].add_metric([name], profile.memory_usable_bytes)
            g["exod_node_memory_reserved_bytes"].add_metric([name], member.memory_reserved_bytes)
            available = member.memory_available_bytes or profile.memory_available_bytes
            g["exod_node_memory_used_bytes"].add_metric([name], max(0, profile.memory_total_bytes - available))
        names = {m.record.profile.node_id: m.record.profile.name for m in view.members.values()}
        for instance in state.instances(view):
            iid, model = instance.instance_id, instance.placement.model_id
            for runner in instance.runners:
                rank = str(runner.rank)
                g["exod_runner_state"].add_metric(
                    [iid, model, rank, names.get(runner.node_id, runner.node_id[:12]),
                     RUNNER_STATES.get(runner.state, "unknown")], 1)
                cache = runner.prefix_cache
                g["exod_prefix_cache_bytes"].add_metric([iid, model, rank], cache.bytes)
                g["exod_prefix_cache_capacity_bytes"].add_metric([iid, model, rank], cache.capacity_bytes)
                g["exod_prefix_cache_tokens"].add_metric([iid, model, rank], cache.tokens)
                if runner.rank == 0:
                    g["exod_instance_queue_depth"].add_metric([iid, model], runner.queue_depth)
                    g["exod_instance_batch_size"].add_metric([iid, model], runner.batch_size)
                    g["exod_instance_max_batch"].add_metric([iid, model], runner.max_batch)
                    g["exod_instance_tokens_per_second"].add_metric([iid, model], runner.tokens_per_s)
                    g["exod_prefix_cache_lookups"].add_metric([iid, model], cache.lookups)
                    g["exod_prefix_cache_hits"].add_metric([iid, model], cache.hits)
                    g["exod_prefix_cache_hit_tokens"].add_metric([iid, model], cache.hit_tokens)
        yield from g.values()
