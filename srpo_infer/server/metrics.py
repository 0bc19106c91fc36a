"""Prometheus counters for the server, rendered in the text exposition format (no dependency)."""

from __future__ import annotations

import threading
from collections import Counter

# Seconds; generation latency spans ~0.5 s (cached, small) to minutes (4 images, 50 steps, CPU).
BUCKETS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """Queue depth, generation latency histogram, images served and responses by status code."""

    def __init__(self):
        self._lock = threading.Lock()
        self.queue_depth = 0
        self.images_served = 0
        self.responses: Counter[int] = Counter()
        self.bucket_counts = [0] * len(BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def observe(self, status: int, seconds: float, generation: bool) -> None:
        """Count one response by status; answered generations also go into the latency histogram."""
        with self._lock:
            self.responses[status] += 1
            if generation:
                self.latency_sum += seconds
                self.latency_count += 1
                for i, bound in enumerate(BUCKETS):
                    if seconds <= bound:
                        self.bucket_counts[i] += 1

    def render(self) -> str:
        """The Prometheus text format."""
        with self._lock:
            lines = [
                "# HELP srpo_queue_depth Generation jobs waiting for the GPU worker.",
                "# TYPE srpo_queue_depth gauge",
                f"srpo_queue_depth {self.queue_depth}",
                "# HELP srpo_images_served_total Images returned to clients.",
                "# TYPE srpo_images_served_total counter",
                f"srpo_images_served_total {self.images_served}",
                "# HELP srpo_responses_total HTTP responses by status code (refusals: 4xx, 503).",
                "# TYPE srpo_responses_total counter",
            ]
            lines += [f'srpo_responses_total{{code="{code}"}} {n}' for code, n in sorted(self.responses.items())]
            lines += [
                "# HELP srpo_generation_seconds Latency of answered generations (200s of POST /v1/images/generations).",
                "# TYPE srpo_generation_seconds histogram",
            ]
            pairs = zip(BUCKETS, self.bucket_counts, strict=True)
            lines += [f'srpo_generation_seconds_bucket{{le="{b}"}} {n}' for b, n in pairs]
            lines += [
                f'srpo_generation_seconds_bucket{{le="+Inf"}} {self.latency_count}',
                f"srpo_generation_seconds_sum {self.latency_sum:.6f}",
                f"srpo_generation_seconds_count {self.latency_count}",
            ]
        return "\n".join(lines) + "\n"
