"""What the server counts, and the Prometheus text it shows on ``GET /metrics``."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence


class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """Counters and histograms, updated by the engine thread and the web handlers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished: dict[str, int] = {}
        self.preemptions = 0
        self.prefix_queried = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found
        self.rejected: dict[str, int] = {}
        self.steps = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)

    def count_http(self, path: str, code: int) -> None:
        with self.lock:
            key = (path, str(code))
            self.http[key] = self.http.get(key, 0) + 1

    def count(self, table: str, key: str) -> None:
        with self.lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + 1


def _histogram(lines: list[str], name: str, help_: str, h: Histogram) -> None:
    lines += [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    total = 0
    for upper, n in zip(h.buckets, h.counts):
        total += n
        lines.append(f'{name}_bucket{{le="{upper:g}"}} {total}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum {h.sum:.6f}")
    lines.append(f"{name}_count {h.count}")


def render_metrics(m: Metrics, gauges: Mapping[str, int | str]) -> str:
    """The Prometheus text exposition format (version 0.0.4) of the counters ``m`` and the
    engine's ``gauges()``."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float)
                         else f"{name}{labels} {value}")

    def label(**kv: str) -> str:
        return "{" + ",".join(f'{k}="{v}"' for k, v in kv.items()) + "}"

    with m.lock:
        http = sorted(m.http.items())
        finished = sorted(m.finished.items())
        rejected = sorted(m.rejected.items())
        metric("kvformer_requests_total", "counter", "HTTP requests by path and status code.",
               [(label(path=p, code=c), n) for (p, c), n in http])
        metric("kvformer_requests_finished_total", "counter",
               "Generations ended, by reason (stop, length, abort, error).",
               [(label(reason=r), n) for r, n in finished])
        metric("kvformer_requests_rejected_total", "counter",
               "Requests answered 429 (queue_full, queue_timeout).",
               [(label(reason=r), n) for r, n in rejected])
        metric("kvformer_prompt_tokens_total", "counter", "Prompt tokens accepted.",
               [("", m.prompt_tokens)])
        metric("kvformer_completion_tokens_total", "counter", "Tokens generated.",
               [("", m.completion_tokens)])
        metric("kvformer_prefix_cache_queried_tokens_total", "counter",
               "Prompt tokens looked up in the prefix cache at admission.",
               [("", m.prefix_queried)])
        metric("kvformer_prefix_cache_hit_tokens_total", "counter",
               "Prompt tokens whose K/V came from the prefix cache.", [("", m.prefix_hits)])
        metric("kvformer_prefix_cache_hit_rate", "gauge",
               "Prompt tokens found in the prefix cache / tokens looked up, since start.",
               [("", m.prefix_hits / m.prefix_queried if m.prefix_queried else 0.0)])
        metric("kvformer_preemptions_total", "counter",
               "Sequences preempted for KV blocks (recomputed later).", [("", m.preemptions)])
        metric("kvformer_engine_steps_total", "counter", "Engine iterations that ran the model.",
               [("", m.steps)])
        _histogram(lines, "kvformer_time_to_first_token_seconds",
                   "From arrival to the first generated token.", m.ttft)
        _histogram(lines, "kvformer_inter_token_latency_seconds",
                   "Between consecutive tokens of one request.", m.itl)
    g = gauges
    metric("kvformer_active_sequences", "gauge", "Sequences in the running batch.",
           [("", g["active_sequences"])])
    metric("kvformer_queue_length", "gauge", "Requests waiting to be admitted.",
           [("", g["queue_length"])])
    metric("kvformer_kv_blocks_used", "gauge", "KV cache blocks in use.",
           [("", g["kv_blocks_used"])])
    metric("kvformer_kv_blocks_free", "gauge", "KV cache blocks free.",
           [("", g["kv_blocks_free"])])
    metric("kvformer_kv_blocks_cached", "gauge",
           "Free KV blocks that still hold a cached prefix (counted in _free).",
           [("", g["kv_blocks_cached"])])
    metric("kvformer_kv_blocks_total", "gauge", "KV cache blocks in the pool.",
           [("", g["kv_blocks_total"])])
    metric("kvformer_kv_block_size", "gauge", "Token slots per KV block.",
           [("", g["kv_block_size"])])
    of_dtype = label(dtype=g["kv_dtype"])
    metric("kvformer_kv_cache_bytes", "gauge",
           "Bytes the KV pool reserves (K and V of every layer, scales included).",
           [(of_dtype, g["kv_cache_bytes"])])
    metric("kvformer_kv_cache_tokens", "gauge", "Token slots the KV pool holds.",
           [(of_dtype, g["kv_cache_tokens"])])
    metric("kvformer_kv_bytes_per_token", "gauge",
           "KV bytes one token takes (every layer's K and V, scales included).",
           [(of_dtype, g["kv_bytes_per_token"])])
    return "\n".join(lines) + "\n"
