"""Prometheus metrics shared by every service (one registry per process; each service is a process)."""

from __future__ import annotations

from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound=MetricWrapperBase)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)

messages_in = Counter("vb_messages_in_total", "Events consumed", ["stage", "channel"])
messages_out = Counter("vb_messages_out_total", "Events published", ["stage", "channel"])
bad_messages = Counter(
    "vb_bad_messages_total", "Messages refused by the contract, by error code", ["stage", "code"]
)
handler_errors = Counter("vb_handler_errors_total", "Events whose handler raised", ["stage", "channel"])
sessions_owned = Gauge("vb_sessions_owned", "Sessions this replica holds", ["stage"])
claims = Counter("vb_claims_total", "Sessions taken, by how", ["stage", "how"])
releases = Counter("vb_releases_total", "Sessions let go, by why", ["stage", "why"])
queue_dropped = Counter("vb_queue_dropped_total", "Items dropped by a full bounded queue", ["stage", "queue"])
publish_retries = Counter("vb_publish_retries_total", "Acknowledged publishes retried", ["stage"])
turn_phase = Histogram(
    "vb_turn_phase_seconds",
    "Per-turn latency of each phase (endpointing, stt_final, llm_ttft, tts_ttfb, ttfa, ...)",
    ["stage", "phase"],
    buckets=LATENCY_BUCKETS,
)


class Children(dict[str, M], Generic[M]):
    """One stage's children of a metric labelled (stage, x), by x, looked up once.

    ``labels()`` takes a lock and builds a key on every call: measurable on paths taken for every
    audio frame.
    """

    def __init__(self, metric: M, stage: str) -> None:
        super().__init__()
        self.metric, self.stage = metric, stage

    def __missing__(self, key: str) -> M:
        child: M = self.metric.labels(self.stage, key)
        self[key] = child
        return child
