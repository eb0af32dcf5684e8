"""Per model-version statistics: the numbers behind ModelStatistics and /metrics.

Plain integers updated on the event loop thread, with Triton's meanings:
*requests* (success/fail), *inferences* (rows: a request of batch 8 counts
8) and *executions* (one per batch the scheduler formed). Prometheus reads
these same objects at scrape time, so the two views can never disagree and
the hot path pays for no metrics library.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import defaultdict
from dataclasses import dataclass, field

from lockgate.errors import FAILURE_REASONS
from lockgate_client._proto import grpc_service_pb2 as pb

#: Default histogram buckets: request, queue and compute time in seconds.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    """A cumulative-on-read histogram: counts per bucket, plus sum and count."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, cumulative count) pairs in Prometheus order, +Inf last."""
        total = 0
        out = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out


@dataclass
class Duration:
    """Triton's StatisticDuration: how often, and how long in total (ns)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_proto(self) -> pb.StatisticDuration:
        return pb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStats:
    """Cumulative statistics of one model version since it loaded."""

    name: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    #: Response cache: hits (lookup and copy out) and misses (lookup and insert).
    cache_hit: Duration = field(default_factory=Duration)
    cache_miss: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    #: Failures by reason; every known reason starts at zero (see FAILURE_REASONS).
    failures: dict[str, int] = field(
        default_factory=lambda: defaultdict(int, dict.fromkeys(FAILURE_REASONS, 0))
    )
    batches: dict[int, BatchDurations] = field(default_factory=lambda: defaultdict(BatchDurations))
    #: Bucket bounds (``--duration-buckets``, ``--batch-size-buckets``); fixed at load.
    duration_buckets: tuple[float, ...] = DURATION_BUCKETS
    batch_buckets: tuple[float, ...] = BATCH_BUCKETS
    request_seconds: Histogram = field(init=False)
    queue_seconds: Histogram = field(init=False)
    compute_seconds: Histogram = field(init=False)
    batch_size: Histogram = field(init=False)
    load_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.request_seconds = Histogram(self.duration_buckets)
        self.queue_seconds = Histogram(self.duration_buckets)
        self.compute_seconds = Histogram(self.duration_buckets)
        self.batch_size = Histogram(self.batch_buckets)

    def record_execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One batch ran: an execution of ``rows`` rows."""
        self.execution_count += 1
        batch = self.batches[rows]
        batch.compute_input.add(input_ns)
        batch.compute_infer.add(infer_ns)
        batch.compute_output.add(output_ns)
        self.batch_size.observe(rows)
        self.compute_seconds.observe((input_ns + infer_ns + output_ns) * 1e-9)

    def record_success(
        self,
        rows: int,
        duration_ns: int,
        queue_ns: int,
        input_ns: int,
        infer_ns: int,
        output_ns: int,
    ) -> None:
        """One request completed; compute times are its batch's."""
        self.success.add(duration_ns)
        self.queue.add(queue_ns)
        self.compute_input.add(input_ns)
        self.compute_infer.add(infer_ns)
        self.compute_output.add(output_ns)
        self.inference_count += rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.request_seconds.observe(duration_ns * 1e-9)
        self.queue_seconds.observe(queue_ns * 1e-9)

    def record_cache_hit(self, duration_ns: int, hit_ns: int) -> None:
        """A request answered from the response cache.

        As in Triton: a success with no queue time, and neither an inference
        nor an execution (those count work the model did).
        """
        self.success.add(duration_ns)
        self.queue.add(0)
        self.cache_hit.add(hit_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.request_seconds.observe(duration_ns * 1e-9)
        self.queue_seconds.observe(0.0)

    def record_cache_miss(self, miss_ns: int) -> None:
        """The model ran for a cacheable request: lookup plus insertion time."""
        self.cache_miss.add(miss_ns)

    def record_failure(self, reason: str, duration_ns: int) -> None:
        self.fail.add(duration_ns)
        self.failures[reason] += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def to_proto(self) -> pb.ModelStatistics:
        return pb.ModelStatistics(
            name=self.name,
            version=self.version,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=self.success.to_proto(),
                fail=self.fail.to_proto(),
                queue=self.queue.to_proto(),
                compute_input=self.compute_input.to_proto(),
                compute_infer=self.compute_infer.to_proto(),
                compute_output=self.compute_output.to_proto(),
                cache_hit=self.cache_hit.to_proto(),
                cache_miss=self.cache_miss.to_proto(),
            ),
            batch_stats=[
                pb.InferBatchStatistics(
                    batch_size=size,
                    compute_input=b.compute_input.to_proto(),
                    compute_infer=b.compute_infer.to_proto(),
                    compute_output=b.compute_output.to_proto(),
                )
                for size, b in sorted(self.batches.items())
            ],
        )
