"""The ingress's own Prometheus metrics (the runtime's shared ones count messages, sessions, errors)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

FAST_BUCKETS = (5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1)

frames_in = Counter("vb_ingress_frames_in_total", "Caller audio frames (20 ms, 16 kHz) taken in", ["source"])
vad_inference = Histogram(
    "vb_ingress_vad_inference_seconds",
    "Silero VAD inference time per batch of 32 ms windows (of different calls)",
    buckets=FAST_BUCKETS,
)
vad_batch = Histogram(
    "vb_ingress_vad_batch_windows", "VAD windows run in one inference", buckets=(1, 2, 4, 8, 16, 32, 64)
)
frame_delay = Histogram(
    "vb_ingress_frame_delay_seconds",
    "From caller audio reaching the ingress to its frame being published (VAD and batching included)",
    buckets=FAST_BUCKETS,
)
