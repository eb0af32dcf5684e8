"""The batcher in-process: merge/split properties, and the Scheduler on a real ORT session.

The scheduler is driven directly on an asyncio loop. Requests submitted
without an ``await`` in between all queue before any batch can finish, which
makes batch formation deterministic; where a test needs a batch to stay
running, a ``GatedRunner`` (a real ONNX Runtime session that waits on an
event before running a batch holding the HOLD value) keeps it there.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper

from lockgate.batcher import QueuePolicy, Scheduler
from lockgate.codec import Limits, TensorSpec, decode_request
from lockgate.config import read_model_config
from lockgate.errors import (
    ExecutionError,
    ModelUnavailableError,
    QueueFullError,
    RequestTimeoutError,
)
from lockgate.request import Array, InferRequest
from lockgate.runner import Placement, Runner, merge_inputs, split_outputs
from lockgate.stats import ModelStats
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import model_config_pb2 as mc
from models.build import (
    MODEL_FILE,
    Tensor,
    build_gather_fail,
    build_identity,
    write_single,
)

T = TypeVar("T")

#: A batch holding this value waits for the gate before it runs.
HOLD = -1.0
#: Generous bound on any single wait; tests never depend on it being reached.
PATIENCE_S = 30.0


# --------------------------------------------------------------------------- merge / split

DTYPES = [np.float32, np.float16, np.int64, np.int8, np.uint16, np.bool_, np.object_]


@st.composite
def batches(draw: st.DrawFn) -> list[InferRequest]:
    """Requests with random row counts sharing random inputs (names, shapes, dtypes)."""
    names = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=3, unique=True))
    shapes = {n: tuple(draw(st.lists(st.integers(1, 3), max_size=2))) for n in names}
    dtypes = {n: draw(st.sampled_from(DTYPES)) for n in names}
    requests = []
    for index, rows in enumerate(draw(st.lists(st.integers(1, 5), min_size=1, max_size=6))):
        inputs: dict[str, Array] = {}
        for name in names:
            shape = (rows, *shapes[name])
            # Every element names its request and row, so misplaced rows show.
            tags = np.arange(int(np.prod(shape))).reshape(shape) + 1000 * index
            inputs[name] = (
                tags.astype(str).astype(np.object_)
                if dtypes[name] is np.object_
                else tags.astype(dtypes[name])
            )
        key = tuple((n, shapes[n]) for n in names)
        requests.append(InferRequest(inputs=inputs, rows=rows, outputs=None, shape_key=key))
    return requests


@given(batches())
@settings(max_examples=200, deadline=None)
def test_merge_then_split_gives_every_request_exactly_its_rows(batch: list[InferRequest]) -> None:
    merged = merge_inputs(batch)
    assert all(len(v) == sum(r.rows for r in batch) for v in merged.values())
    # An identity model: the outputs are the merged inputs, under other names.
    outputs = {f"out_{name}": value for name, value in merged.items()}
    parts = split_outputs(outputs, batch)
    assert len(parts) == len(batch)
    for request, part in zip(batch, parts, strict=True):
        assert sorted(part) == sorted(f"out_{n}" for n in request.inputs)
        for name, value in request.inputs.items():
            got = part[f"out_{name}"]
            assert got.dtype == value.dtype
            assert got.shape == value.shape
            assert np.array_equal(got, value)


def test_split_rejects_an_output_without_the_batch_dimension() -> None:
    batch = [_request(0, rows=2), _request(1, rows=1)]
    with pytest.raises(ExecutionError, match="must start with the batch size"):
        split_outputs({"OUTPUT0": np.zeros((2, 4), np.float32)}, batch)
    with pytest.raises(ExecutionError):
        split_outputs({"OUTPUT0": np.zeros((), np.float32)}, batch)


# --------------------------------------------------------------------------- queue policy


@pytest.mark.parametrize(
    ("default_us", "allow", "request_us", "expected_us"),
    [
        (0, False, 0, 0),
        (0, False, 500, 0),  # no override allowed: the request's timeout is ignored
        (1000, False, 500, 1000),
        (1000, True, 500, 500),  # an override may shorten the default...
        (1000, True, 5000, 1000),  # ...but never lengthen it
        (0, True, 500, 500),  # no default means no limit: any override is shorter
        (1000, True, 0, 1000),
    ],
)
def test_queue_timeout_override_follows_triton(
    default_us: int, allow: bool, request_us: int, expected_us: int
) -> None:
    policy = QueuePolicy(default_timeout_ns=default_us * 1000, allow_override=allow)
    assert policy.timeout_ns(request_us) == expected_us * 1000


# --------------------------------------------------------------------------- scheduler harness


@dataclass
class RunLog:
    """What the gated runners executed, shared by all instances of one scheduler."""

    gate: threading.Event = field(default_factory=threading.Event)
    #: Per session run, in completion order: the request tag of every row.
    runs: list[list[int]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    def record(self, tags: list[int]) -> None:
        with self.changed:
            self.runs.append(tags)
            self.changed.notify_all()

    def wait_for_runs(self, count: int) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: len(self.runs) >= count, PATIENCE_S)

    def executed_tags(self) -> list[int]:
        return sorted(tag for run in self.runs for tag in run)


class GatedRunner(Runner):
    """A real ONNX Runtime session that logs its runs and holds HOLD batches at the gate."""

    def __init__(self, path: Path, config: mc.ModelConfig, log: RunLog) -> None:
        super().__init__(path, config, Placement(gpu=None, intra_op_threads=1))
        self.log = log

    def run(self, feeds: dict[str, Array]) -> dict[str, Array]:
        first = next(iter(feeds.values()))
        if (first == HOLD).any():
            assert self.log.gate.wait(PATIENCE_S), "the test never opened the gate"
        outputs = super().run(feeds)
        self.log.record([_tag(row) for row in first])
        return outputs


def _tag(row: Array) -> int:
    return -1 if (row == HOLD).any() else int(row.flat[0])


@dataclass
class Harness:
    scheduler: Scheduler
    stats: ModelStats
    log: RunLog

    def executions(self) -> dict[int, int]:
        """Batch size -> how many batches of that size ran (ModelStats.batches)."""
        return {size: b.compute_infer.count for size, b in self.stats.batches.items()}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("unit-repo")
    build_identity(path, "identity", "TYPE_FP32", max_batch_size=8, dims=(-1,))
    build_gather_fail(path)
    two = [Tensor("A", "TYPE_FP32", (-1,)), Tensor("B", "TYPE_FP32", (-1,))]
    outs = [Tensor("OUT_A", "TYPE_FP32", (-1,)), Tensor("OUT_B", "TYPE_FP32", (-1,))]
    nodes = [
        helper.make_node("Identity", ["A"], ["OUT_A"]),
        helper.make_node("Identity", ["B"], ["OUT_B"]),
    ]
    write_single(path, "pair", nodes, two, outs, max_batch_size=8)
    return path


def make_harness(
    repo: Path, batching: str | None, *, model: str = "identity", instances: int = 1
) -> Harness:
    """A Scheduler over ``instances`` real sessions of ``model``, with this batching block."""
    config = read_model_config(repo / model)
    config.ClearField("dynamic_batching")
    if batching is not None:
        text_format.Merge(batching, config)
    log = RunLog()
    runners: list[Runner] = [
        GatedRunner(repo / model / "1" / MODEL_FILE, config, log) for _ in range(instances)
    ]
    stats = ModelStats(name=model, version="1")
    return Harness(Scheduler(config, runners, stats), stats, log)


def run_async(
    repo: Path,
    batching: str | None,
    test: Callable[[Harness], Awaitable[T]],
    **kwargs: Any,
) -> T:
    """Run ``test`` on a fresh loop and scheduler; always open the gate and close up."""

    async def main() -> T:
        harness = make_harness(repo, batching, **kwargs)
        try:
            return await asyncio.wait_for(test(harness), PATIENCE_S)
        finally:
            # Fail whatever a failed test left queued, let running batches end.
            harness.log.gate.set()
            harness.scheduler.close()
            await asyncio.wait_for(harness.scheduler.wait_idle(), PATIENCE_S)

    return asyncio.run(main())


def _request(
    tag: int, rows: int = 1, width: int = 4, *, hold: bool = False, **fields: Any
) -> InferRequest:
    """An identity-model request whose every element is ``tag`` (HOLD: held at the gate)."""
    value = np.full((rows, width), HOLD if hold else tag, np.float32)
    return InferRequest(
        inputs={"INPUT0": value},
        rows=rows,
        outputs=None,
        shape_key=(("INPUT0", (width,)),),
        **fields,
    )


def submit(harness: Harness, *requests: InferRequest) -> list[asyncio.Future[dict[str, Array]]]:
    return [harness.scheduler.submit(r) for r in requests]


async def outputs_of(
    requests: list[InferRequest], futures: list[asyncio.Future[dict[str, Array]]]
) -> None:
    """Every request got back exactly its own rows."""
    for request, future in zip(requests, futures, strict=True):
        got = (await future)["OUTPUT0"]
        assert np.array_equal(got, request.inputs["INPUT0"])


DYNAMIC = "dynamic_batching { }"


# --------------------------------------------------------------------------- batch formation


def test_batches_count_rows_not_requests(repo: Path) -> None:
    async def test(h: Harness) -> None:
        # The first request takes the idle instance; three of 3 rows queue behind it.
        requests = [_request(0), *(_request(tag, rows=3) for tag in (1, 2, 3))]
        await outputs_of(requests, submit(h, *requests))
        # max_batch_size 8: 3 + 3 fit, a third 3 would make 9.
        assert h.executions() == {1: 1, 6: 1, 3: 1}
        assert [sorted(set(run)) for run in h.log.runs] == [[0], [1, 2], [3]]

    run_async(repo, DYNAMIC, test)


def test_a_full_batch_stops_at_max_rows_exactly(repo: Path) -> None:
    async def test(h: Harness) -> None:
        requests = [_request(0), *(_request(tag, rows=2) for tag in range(1, 6))]
        await outputs_of(requests, submit(h, *requests))
        assert h.executions() == {1: 1, 8: 1, 2: 1}

    run_async(repo, DYNAMIC, test)


def test_only_requests_of_equal_shape_are_merged(repo: Path) -> None:
    async def test(h: Harness) -> None:
        requests = [
            _request(0),
            _request(1, width=4),
            _request(2, width=5),
            _request(3, width=4),
            _request(4, width=5),
        ]
        await outputs_of(requests, submit(h, *requests))
        assert [sorted(set(run)) for run in h.log.runs] == [[0], [1, 3], [2, 4]]

    run_async(repo, DYNAMIC, test)


def test_preserve_ordering_closes_a_batch_at_a_shape_change(repo: Path) -> None:
    async def test(h: Harness) -> None:
        requests = [
            _request(0),
            _request(1, width=4),
            _request(2, width=4),
            _request(3, width=5),
            _request(4, width=4),
        ]
        await outputs_of(requests, submit(h, *requests))
        # Request 4 may not overtake request 3.
        assert [sorted(set(run)) for run in h.log.runs] == [[0], [1, 2], [3], [4]]

    run_async(repo, "dynamic_batching { preserve_ordering: true }", test)


def test_inputs_listed_in_another_order_are_never_merged_as_equals(repo: Path) -> None:
    """Same shapes in another order (A:3,B:5 vs B:3,A:5) must not be concatenated."""
    specs = {n: TensorSpec(name=n, datatype="FP32", dims=(-1,)) for n in ("A", "B")}

    def decoded(order: list[tuple[str, int]], tag: float) -> InferRequest:
        wire = pb.ModelInferRequest(model_name="pair")
        for name, width in order:
            wire.inputs.add(name=name, datatype="FP32", shape=[1, width])
            wire.raw_input_contents.append(np.full((1, width), tag, np.float32).tobytes())
        return decode_request(wire, specs, frozenset({"OUT_A", "OUT_B"}), Limits(8))

    async def test(h: Harness) -> None:
        first = decoded([("A", 3), ("B", 5)], 0)
        second = decoded([("A", 3), ("B", 5)], 1)
        swapped = decoded([("B", 3), ("A", 5)], 2)
        futures = submit(h, first, second, swapped)
        for request, future in zip((first, second, swapped), futures, strict=True):
            outputs = await future
            for name in ("A", "B"):
                assert np.array_equal(outputs[f"OUT_{name}"], request.inputs[name])
        assert h.executions() == {1: 3}

    run_async(repo, DYNAMIC, test, model="pair")


def test_with_no_delay_whatever_is_queued_goes_even_if_not_preferred(repo: Path) -> None:
    async def test(h: Harness) -> None:
        requests = [_request(tag) for tag in range(4)]
        await outputs_of(requests, submit(h, *requests))
        assert h.executions() == {1: 1, 3: 1}

    run_async(repo, "dynamic_batching { preferred_batch_size: [ 4 ] }", test)


def test_queue_delay_waits_to_fill_a_batch(repo: Path) -> None:
    async def test(h: Harness) -> None:
        # The instance is idle, yet nothing runs before the delay: one batch of 3.
        # (Only a 0.3 s stall between two submit() calls could split it.)
        requests = [_request(tag) for tag in range(3)]
        await outputs_of(requests, submit(h, *requests))
        assert h.executions() == {3: 1}

    run_async(repo, "dynamic_batching { max_queue_delay_microseconds: 300000 }", test)


def test_a_preferred_size_goes_at_once_and_big_batches_are_trimmed_to_one(repo: Path) -> None:
    # A delay far longer than the test: only preferred sizes can make batches run.
    batching = """dynamic_batching {
        preferred_batch_size: [ 2, 4 ]
        max_queue_delay_microseconds: 30000000
    }"""

    async def test(h: Harness) -> None:
        held = _request(0, rows=2, hold=True)
        requests = [_request(tag) for tag in range(1, 7)]
        futures = submit(h, held, *requests)
        h.log.gate.set()
        await outputs_of(requests, futures[1:])
        # 6 rows queued behind the held batch: 4 (preferred) go first, then 2.
        assert h.executions() == {2: 2, 4: 1}
        assert [sorted(set(run)) for run in h.log.runs[1:]] == [[1, 2, 3, 4], [5, 6]]

    run_async(repo, batching, test)


# --------------------------------------------------------------------------- priorities and order


def test_higher_priority_runs_first(repo: Path) -> None:
    batching = "dynamic_batching { priority_levels: 3 default_priority_level: 2 }"

    async def test(h: Harness) -> None:
        # 5 rows each, so that no two share a batch and the run order is the order.
        requests = [
            _request(0, rows=5),
            _request(1, rows=5, priority=3),
            _request(2, rows=5),  # default level 2
            _request(3, rows=5, priority=1),
            _request(4, rows=5, priority=9),  # out of range: default level
            _request(5, rows=5, priority=2),
        ]
        await outputs_of(requests, submit(h, *requests))
        assert [run[0] for run in h.log.runs] == [0, 3, 2, 4, 5, 1]

    run_async(repo, batching, test)


def test_preserve_ordering_holds_back_a_batch_that_finished_early(repo: Path) -> None:
    async def test(h: Harness) -> None:
        slow = _request(0, hold=True)
        fast = [_request(1, width=5), _request(2, width=6)]
        done: list[int] = []
        futures = submit(h, slow, *fast)
        for tag, future in enumerate(futures):
            future.add_done_callback(functools.partial(_note, done, tag))
        # Both later batches ran on the second instance while the first is held...
        assert await asyncio.to_thread(h.log.wait_for_runs, 2)
        await asyncio.sleep(0.01)
        assert done == []  # ...but their callers must wait for the first one.
        h.log.gate.set()
        await asyncio.gather(*futures)
        assert done == [0, 1, 2]
        assert [run[0] for run in h.log.runs] == [1, 2, -1]

    run_async(repo, "dynamic_batching { preserve_ordering: true }", test, instances=2)


def _note(done: list[int], tag: int, future: asyncio.Future[Any]) -> None:
    done.append(tag)


def test_instances_run_batches_concurrently(repo: Path) -> None:
    async def test(h: Harness) -> None:
        held = _request(0, hold=True)
        free = _request(1, width=5)
        held_future, free_future = submit(h, held, free)
        # The second instance serves the second request while the first is held.
        await outputs_of([free], [free_future])
        assert not held_future.done()
        h.log.gate.set()
        await held_future

    run_async(repo, DYNAMIC, test, instances=2)


def test_without_dynamic_batching_each_request_runs_alone_on_any_instance(repo: Path) -> None:
    async def test(h: Harness) -> None:
        held = _request(0, hold=True)
        others = [_request(tag) for tag in range(1, 5)]
        futures = submit(h, held, *others)
        await outputs_of(others, futures[1:])
        assert not futures[0].done()
        h.log.gate.set()
        await futures[0]
        assert h.executions() == {1: 5}

    run_async(repo, None, test, instances=2)


# --------------------------------------------------------------------------- queue policy


def test_a_full_queue_rejects_at_once_and_a_cancelled_request_frees_its_slot(
    repo: Path,
) -> None:
    batching = "dynamic_batching { default_queue_policy { max_queue_size: 2 } }"

    async def test(h: Harness) -> None:
        running = _request(0)  # takes the instance: not in the queue
        queued = [_request(1), _request(2)]
        futures = submit(h, running, *queued)
        with pytest.raises(QueueFullError):
            h.scheduler.submit(_request(3))
        futures[1].cancel()
        await asyncio.sleep(0)  # the cancellation callback runs
        late = _request(4)
        futures.append(h.scheduler.submit(late))
        await outputs_of([running, queued[1], late], [futures[0], futures[2], futures[3]])
        assert h.log.executed_tags() == [0, 2, 4]

    run_async(repo, batching, test)


def test_queue_timeout_reject_fails_the_request_without_running_it(repo: Path) -> None:
    batching = """dynamic_batching {
        default_queue_policy { default_timeout_microseconds: 1000 timeout_action: REJECT }
    }"""

    async def test(h: Harness) -> None:
        held = _request(0, hold=True)
        late = _request(1)
        held_future, late_future = submit(h, held, late)
        with pytest.raises(RequestTimeoutError):
            await late_future
        h.log.gate.set()
        await held_future
        assert h.log.executed_tags() == [-1]

    run_async(repo, batching, test)


def test_queue_timeout_delay_runs_the_request_after_its_level_but_before_lower_ones(
    repo: Path,
) -> None:
    batching = """dynamic_batching {
        priority_levels: 2
        default_priority_level: 1
        default_queue_policy { timeout_action: DELAY allow_timeout_override: true }
    }"""

    async def test(h: Harness) -> None:
        held = _request(0, rows=5, hold=True)
        expiring = _request(1, rows=5, timeout_us=1000)
        patient = _request(2, rows=5)
        lower = _request(3, rows=5, priority=2)
        futures = submit(h, held, expiring, patient, lower)
        await asyncio.sleep(0.05)  # the 1 ms queue timeout fires first
        h.log.gate.set()
        await outputs_of([expiring, patient, lower], futures[1:])
        assert [run[0] for run in h.log.runs] == [-1, 2, 1, 3]

    run_async(repo, batching, test)


def test_a_request_timeout_without_allow_override_is_ignored(repo: Path) -> None:
    async def test(h: Harness) -> None:
        held = _request(0, hold=True)
        patient = _request(1, timeout_us=1000)
        futures = submit(h, held, patient)
        await asyncio.sleep(0.05)  # long past the timeout the request asked for
        h.log.gate.set()
        await outputs_of([patient], futures[1:])

    run_async(repo, DYNAMIC, test)


# --------------------------------------------------------------------------- callers that leave


def test_cancelled_requests_are_never_run(repo: Path) -> None:
    async def test(h: Harness) -> None:
        requests = [_request(tag) for tag in range(5)]
        futures = submit(h, *requests)
        futures[2].cancel()
        futures[3].cancel()
        kept = [0, 1, 4]
        await outputs_of([requests[i] for i in kept], [futures[i] for i in kept])
        assert h.log.executed_tags() == kept
        assert h.executions() == {1: 1, 2: 1}

    run_async(repo, DYNAMIC, test)


def test_a_request_past_its_deadline_is_dropped_not_run(repo: Path) -> None:
    async def test(h: Harness) -> None:
        running = _request(0)
        expired = _request(1, deadline=time.monotonic() - 1)
        alive = _request(2, deadline=time.monotonic() + 3600)
        futures = submit(h, running, expired, alive)
        with pytest.raises(RequestTimeoutError, match="deadline"):
            await futures[1]
        await outputs_of([running, alive], [futures[0], futures[2]])
        assert h.log.executed_tags() == [0, 2]

    run_async(repo, DYNAMIC, test)


def test_wait_idle_returns_when_the_last_queued_caller_leaves(repo: Path) -> None:
    async def test(h: Harness) -> None:
        # A long delay keeps the requests queued with no batch running.
        futures = submit(h, _request(0), _request(1))
        idle = asyncio.ensure_future(h.scheduler.wait_idle())
        await asyncio.sleep(0)
        assert not idle.done()
        for future in futures:
            future.cancel()
        await idle
        assert h.log.runs == []

    run_async(repo, "dynamic_batching { max_queue_delay_microseconds: 30000000 }", test)


def test_close_fails_what_is_still_queued(repo: Path) -> None:
    async def test(h: Harness) -> None:
        futures = submit(h, _request(0), _request(1))
        h.scheduler.close()
        for future in futures:
            with pytest.raises(ModelUnavailableError):
                await future
        with pytest.raises(ModelUnavailableError):
            h.scheduler.submit(_request(2))

    run_async(repo, "dynamic_batching { max_queue_delay_microseconds: 30000000 }", test)


# --------------------------------------------------------------------------- failures


def test_a_failing_batch_fails_only_the_request_at_fault(repo: Path) -> None:
    def gather(tag: int, index: int) -> InferRequest:
        return InferRequest(
            inputs={
                "INPUT": np.arange(4, dtype=np.float32)[None, :] + 10 * tag,
                "INDEX": np.array([[index]], np.int64),
            },
            rows=1,
            outputs=None,
            shape_key=(("INPUT", (4,)), ("INDEX", (1,))),
        )

    async def test(h: Harness) -> None:
        requests = [gather(0, 0), gather(1, 1), gather(2, 7), gather(3, 3)]
        futures = submit(h, *requests)
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[2], ExecutionError)
        for tag, index in ((0, 0), (1, 1), (3, 3)):
            result = results[tag]
            assert isinstance(result, dict)
            assert result["OUTPUT"].tolist() == [[float(index + 10 * tag)]]
        # The merged batch of three failed; its two good requests re-ran alone.
        assert h.executions() == {1: 3}

    run_async(repo, DYNAMIC, test, model="gather_fail")


# --------------------------------------------------------------------------- properties


@st.composite
def workloads(draw: st.DrawFn) -> list[tuple[int, int, bool]]:
    """(rows, width, cancel) per request; the first one is never cancelled (it runs at once)."""
    shape = st.tuples(st.integers(1, 8), st.sampled_from([3, 4]), st.booleans())
    items = draw(st.lists(shape, min_size=1, max_size=12))
    items[0] = (items[0][0], items[0][1], False)
    return items


@given(workload=workloads())
@settings(max_examples=80, deadline=None)
def test_every_request_gets_its_rows_and_no_batch_breaks_the_rules(
    repo: Path, workload: list[tuple[int, int, bool]]
) -> None:
    async def test(h: Harness) -> None:
        requests = [_request(tag, rows, width) for tag, (rows, width, _) in enumerate(workload)]
        futures = submit(h, *requests)
        for future, (_, _, cancel) in zip(futures, workload, strict=True):
            if cancel:
                future.cancel()
        wanted = [i for i, (_, _, cancel) in enumerate(workload) if not cancel]
        await outputs_of([requests[i] for i in wanted], [futures[i] for i in wanted])
        # Nothing lost, nothing run twice, nothing run for a caller that left.
        assert h.log.executed_tags() == sorted(i for i in wanted for _ in range(workload[i][0]))
        for run in h.log.runs:
            assert len(run) <= 8
            assert len({workload[tag][1] for tag in run}) == 1
        executed_rows = sum(size * count for size, count in h.executions().items())
        assert executed_rows == sum(workload[i][0] for i in wanted)

    run_async(repo, DYNAMIC, test)
