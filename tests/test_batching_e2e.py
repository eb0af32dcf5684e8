"""Dynamic batching end to end: a real ``lockgate serve`` and real clients.

One private server serves a repository built for this module, one model per
test, so every test reads statistics nobody else touches. Most tests make
batch formation deterministic with HOLD batching: a preferred size of 8 and
a one-minute queue delay, so a batch runs exactly when 8 rows are queued and
the test decides when that is. Progress is observed through the server's
statistics and its ``nv_inference_pending_request_count`` gauge; nothing
asserts on a duration.
"""

from __future__ import annotations

import asyncio
import queue
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import support
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from support import ServerProcess, launch_server
from tritonclient.utils import InferenceServerException

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as service
from models.build import (
    CONFIG_FILE,
    DYNAMIC_BATCHING,
    build_gather_fail,
    build_identity,
    build_simple,
    build_slow,
)

#: Every test here runs against a single-process server and one with two front ends.
pytestmark = pytest.mark.frontends(1, 2)

#: A queue delay that outlasts any test: only a preferred size makes a batch run.
MINUTE_DELAY = "max_queue_delay_microseconds: 60000000"
#: A batch runs exactly when 8 rows are queued.
HOLD = "preferred_batch_size: [ 8 ] " + MINUTE_DELAY
#: Bound on every wait for the server; reaching it is a failure, never a pass.
PATIENCE_S = 30.0
#: The slow model's input width.
WIDTH = 256


def batching(*fields: str) -> str:
    return "dynamic_batching { " + " ".join(fields) + " }"


def _rebatch(model_dir: Path, block: str) -> None:
    """Replace a built model's dynamic_batching block with ``block``."""
    path = model_dir / CONFIG_FILE
    text = path.read_text()
    assert DYNAMIC_BATCHING in text
    path.write_text(text.replace(DYNAMIC_BATCHING, block))


def build_models(repo: Path) -> None:
    build_simple(repo)
    build_identity(repo, "ragged", "TYPE_FP32", max_batch_size=8, dims=(-1,))
    build_slow(repo, "unbatched", iterations=1, instance_count=2, dynamic_batching=None)
    _rebatch(build_gather_fail(repo), batching("preferred_batch_size: [ 4 ]", MINUTE_DELAY))
    # iterations=1: these tests are about the queue, not about slow batches.
    quick: dict[str, str] = {
        "cancel_hold": batching(HOLD),
        "queue_full": batching(HOLD, "default_queue_policy { max_queue_size: 2 }"),
        "timeout_reject": batching(
            HOLD,
            "default_queue_policy { default_timeout_microseconds: 60000000",
            "allow_timeout_override: true timeout_action: REJECT }",
        ),
        "timeout_delay": batching(
            HOLD,
            "default_queue_policy { default_timeout_microseconds: 1000 timeout_action: DELAY }",
        ),
        "priority": batching(HOLD, "priority_levels: 2 default_priority_level: 2"),
        "stream_hold": batching(HOLD),
    }
    for name, block in quick.items():
        build_slow(repo, name, iterations=1, dynamic_batching=block)
    build_slow(
        repo, "ordered", instance_count=2, dynamic_batching=batching("preserve_ordering: true")
    )
    # A 1 ms queue timeout: a request that ever waited for an instance fails.
    build_slow(
        repo,
        "two_instances",
        instance_count=2,
        dynamic_batching=batching(
            "default_queue_policy { default_timeout_microseconds: 1000 timeout_action: REJECT }"
        ),
    )


@pytest.fixture(scope="module")
def batching_server(
    tmp_path_factory: pytest.TempPathFactory, frontends: int
) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("batching-repo")
    build_models(repo)
    logs = tmp_path_factory.mktemp("batching-logs")
    proc = launch_server(repo, logs, "--drain-seconds", "5", frontends=frontends)
    yield proc
    assert proc.stop() == 0


# --------------------------------------------------------------------------- observing the server


def metric(server: ServerProcess, name: str, model: str, **labels: str) -> float:
    """One sample of a Prometheus family for ``model`` (0 when absent)."""
    return support.metric(support.scrape(server), name, model=model, **labels) or 0.0


def pending(server: ServerProcess, model: str) -> int:
    return int(metric(server, "nv_inference_pending_request_count", model))


def failures(server: ServerProcess, model: str, reason: str) -> int:
    return int(metric(server, "nv_inference_request_failure", model, reason=reason))


async def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` (off the event loop) until it holds."""
    deadline = time.monotonic() + PATIENCE_S
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


async def wait_pending(server: ServerProcess, model: str, count: int) -> None:
    await wait_until(lambda: pending(server, model) == count, f"{count} queued on {model}")


def statistics(server: ServerProcess, model: str) -> pb.ModelStatistics:
    with grpc.insecure_channel(server.url) as channel:
        stub = service.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        reply: pb.ModelStatisticsResponse = stub.ModelStatistics(
            pb.ModelStatisticsRequest(name=model), timeout=PATIENCE_S
        )
    (stats,) = reply.model_stats
    return stats


def executions(stats: pb.ModelStatistics) -> dict[int, int]:
    """Batch size -> executions of that size."""
    return {b.batch_size: b.compute_infer.count for b in stats.batch_stats}


def executed_rows(stats: pb.ModelStatistics) -> int:
    return sum(size * count for size, count in executions(stats).items())


# --------------------------------------------------------------------------- requests


def rows_of(tag: float, rows: int) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.full((rows, WIDTH), tag, np.float32)


def slow_input(tag: float, rows: int = 1) -> list[triton.InferInput]:
    value = triton.InferInput("INPUT0", [rows, WIDTH], "FP32")
    value.set_data_from_numpy(rows_of(tag, rows))
    return [value]


def raw_request(model: str, tag: int, rows: int = 1) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=str(tag))
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, WIDTH])
    request.raw_input_contents.append(rows_of(tag, rows).tobytes())
    return request


def raw_output(reply: pb.ModelInferResponse) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(
        tuple(reply.outputs[0].shape)
    )


def status_of(error: BaseException) -> str:
    assert isinstance(error, InferenceServerException), repr(error)
    return str(error.status())


# --------------------------------------------------------------------------- tests


def test_concurrent_clients_each_get_exactly_their_rows(batching_server: ServerProcess) -> None:
    tasks, per_task = 32, 20

    async def client_task(client: triton_aio.InferenceServerClient, task: int) -> int:
        rows_sent = 0
        for i in range(per_task):
            rows = 1 + (task + i) % 3
            base = (task * per_task + i) * 100
            a = (np.arange(rows * 16, dtype=np.int32) + base).reshape(rows, 16)
            b = np.full((rows, 16), task - i, np.int32)
            inputs = [
                triton_aio.InferInput("INPUT0", [rows, 16], "INT32"),
                triton_aio.InferInput("INPUT1", [rows, 16], "INT32"),
            ]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = await client.infer("simple", inputs, request_id=f"{task}-{i}")
            assert result.get_response().id == f"{task}-{i}"
            assert np.array_equal(result.as_numpy("OUTPUT0"), a + b)
            assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
            rows_sent += rows
        return rows_sent

    async def main() -> int:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            sent = await asyncio.gather(*(client_task(client, t) for t in range(tasks)))
        finally:
            await client.close()
        return sum(sent)

    total_rows = asyncio.run(main())
    stats = statistics(batching_server, "simple")
    assert stats.inference_stats.success.count == tasks * per_task
    assert stats.inference_stats.fail.count == 0
    assert stats.inference_count == total_rows
    # Every row computed once, and concurrent requests shared batches.
    assert executed_rows(stats) == total_rows
    assert stats.execution_count < stats.inference_count
    assert max(executions(stats)) <= 8
    # Every success has its queue and compute times; every batch its own.
    timings = stats.inference_stats
    for duration in (timings.queue, timings.compute_input, timings.compute_infer):
        assert duration.count == tasks * per_task
    for batch in stats.batch_stats:
        assert (
            batch.compute_input.count
            == batch.compute_output.count
            == executions(stats)[batch.batch_size]
        )


def test_requests_of_different_shapes_never_mix(batching_server: ServerProcess) -> None:
    """``ragged`` takes [rows, any width]; only equal widths may share a batch."""
    model = "ragged"

    async def client_task(client: triton_aio.InferenceServerClient, task: int) -> int:
        rows_sent = 0
        for i in range(15):
            rows, width = 1 + (task + i) % 3, (3, 5, 7)[(task * 7 + i) % 3]
            value = np.arange(rows * width, dtype=np.float32).reshape(rows, width)
            value += 1000 * (task * 15 + i)
            tensor = triton_aio.InferInput("INPUT0", [rows, width], "FP32")
            tensor.set_data_from_numpy(value)
            result = await client.infer(model, [tensor])
            assert np.array_equal(result.as_numpy("OUTPUT0"), value)
            rows_sent += rows
        return rows_sent

    async def main() -> int:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            return sum(await asyncio.gather(*(client_task(client, t) for t in range(8))))
        finally:
            await client.close()

    total_rows = asyncio.run(main())
    stats = statistics(batching_server, model)
    assert stats.inference_stats.fail.count == 0
    assert stats.inference_count == executed_rows(stats) == total_rows


def test_without_dynamic_batching_every_request_runs_alone(batching_server: ServerProcess) -> None:
    model = "unbatched"

    async def main() -> None:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            results = await asyncio.gather(
                *(client.infer(model, slow_input(tag, rows=2)) for tag in range(6))
            )
        finally:
            await client.close()
        for tag, result in enumerate(results):
            assert np.array_equal(result.as_numpy("OUTPUT0"), rows_of(tag, 2))

    asyncio.run(main())
    # Two rows each could have shared batches of 8; without a batcher none did.
    assert executions(statistics(batching_server, model)) == {2: 6}


@pytest.mark.parametrize("seed", [1, 2])
def test_cancelled_and_expired_callers_are_never_computed(
    batching_server: ServerProcess, seed: int
) -> None:
    model = "cancel_hold"
    rng = random.Random(seed)
    before = statistics(batching_server, model)
    cancelled_before = failures(batching_server, model, "CANCELLED")
    expired_before = failures(batching_server, model, "DEADLINE_EXCEEDED")

    async def main() -> int:
        async with grpc.aio.insecure_channel(batching_server.url) as channel:
            stub = service.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            # Seven single rows stay queued: a batch needs eight.
            calls = [stub.ModelInfer(raw_request(model, tag)) for tag in range(7)]
            await wait_pending(batching_server, model, 7)
            cancel = rng.sample(range(7), rng.randint(1, 4))
            for tag in cancel:
                calls[tag].cancel()
            for tag in cancel:
                with pytest.raises(asyncio.CancelledError):
                    await calls[tag]
            # Short deadlines on requests queued with the held ones (never 8 rows).
            expiring = [
                stub.ModelInfer(raw_request(model, 100 + i), timeout=0.2)
                for i in range(rng.randint(1, len(cancel)))
            ]
            for call in expiring:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            kept = [tag for tag in range(7) if tag not in cancel]
            await wait_pending(batching_server, model, len(kept))
            # Fill the batch: now it runs, with the kept requests only.
            filler = stub.ModelInfer(raw_request(model, 50, rows=8 - len(kept)))
            for tag in kept:
                reply = await calls[tag]
                assert reply.id == str(tag)
                assert np.array_equal(raw_output(reply), rows_of(tag, 1))
            assert np.array_equal(raw_output(await filler), rows_of(50, 8 - len(kept)))
            assert failures(batching_server, model, "CANCELLED") == cancelled_before + len(cancel)
            assert failures(batching_server, model, "DEADLINE_EXCEEDED") == expired_before + len(
                expiring
            )
            return len(kept) + 1

    succeeded = asyncio.run(main())
    after = statistics(batching_server, model)
    # Exactly one batch ran, of 8 rows, all of them for callers still there.
    assert after.execution_count - before.execution_count == 1
    assert executed_rows(after) - executed_rows(before) == 8
    assert after.inference_count - before.inference_count == 8
    assert after.inference_stats.success.count - before.inference_stats.success.count == succeeded


def test_a_full_queue_is_refused_at_once(batching_server: ServerProcess) -> None:
    model = "queue_full"

    async def main() -> None:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            first = asyncio.ensure_future(client.infer(model, slow_input(1)))
            await wait_pending(batching_server, model, 1)
            second = asyncio.ensure_future(client.infer(model, slow_input(2)))
            await wait_pending(batching_server, model, 2)
            with triton.InferenceServerClient(batching_server.url) as sync_client:
                # Refused, not queued: it would otherwise wait a minute and time out.
                with pytest.raises(InferenceServerException) as caught:
                    sync_client.infer(model, slow_input(3), client_timeout=PATIENCE_S)
                assert status_of(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
            # A caller that leaves frees its place, even behind the queue's head.
            second.cancel()
            await wait_pending(batching_server, model, 1)
            last = await client.infer(model, slow_input(4, rows=7))
            assert np.array_equal(last.as_numpy("OUTPUT0"), rows_of(4, 7))
            assert np.array_equal((await first).as_numpy("OUTPUT0"), rows_of(1, 1))
        finally:
            await client.close()

    asyncio.run(main())
    stats = statistics(batching_server, model)
    assert executions(stats) == {8: 1}
    assert failures(batching_server, model, "RESOURCE_EXHAUSTED") == 1


def test_queue_timeout_reject_with_a_request_override(batching_server: ServerProcess) -> None:
    model = "timeout_reject"
    with (
        triton.InferenceServerClient(batching_server.url) as client,
        pytest.raises(InferenceServerException) as caught,
    ):
        # 100 ms instead of the model's minute (allow_timeout_override).
        client.infer(model, slow_input(1), timeout=100_000, client_timeout=PATIENCE_S)
    assert status_of(caught.value) == "StatusCode.DEADLINE_EXCEEDED"
    assert "timed out in the queue" in str(caught.value.message())
    stats = statistics(batching_server, model)
    assert stats.execution_count == 0
    assert failures(batching_server, model, "DEADLINE_EXCEEDED") == 1


def test_queue_timeout_delay_still_runs_the_request(batching_server: ServerProcess) -> None:
    model = "timeout_delay"

    async def main() -> None:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            late = asyncio.ensure_future(client.infer(model, slow_input(1)))
            await wait_pending(batching_server, model, 1)
            await asyncio.sleep(0.05)  # well past its 1 ms queue timeout
            filler = await client.infer(model, slow_input(2, rows=7))
            assert np.array_equal(filler.as_numpy("OUTPUT0"), rows_of(2, 7))
            assert np.array_equal((await late).as_numpy("OUTPUT0"), rows_of(1, 1))
        finally:
            await client.close()

    asyncio.run(main())
    assert executions(statistics(batching_server, model)) == {8: 1}


def test_a_higher_priority_request_overtakes_queued_ones(batching_server: ServerProcess) -> None:
    model = "priority"

    async def main() -> None:
        client = triton_aio.InferenceServerClient(batching_server.url)
        try:
            low_a = asyncio.ensure_future(client.infer(model, slow_input(1, rows=4)))
            await wait_pending(batching_server, model, 1)
            low_b = asyncio.ensure_future(client.infer(model, slow_input(2, rows=3), priority=2))
            await wait_pending(batching_server, model, 2)
            # 4 + 3 rows wait for an eighth. The urgent request's 4 rows join the
            # first low one ahead of the second: 4 + 4, and that batch runs.
            urgent = await client.infer(model, slow_input(3, rows=4), priority=1)
            assert np.array_equal(urgent.as_numpy("OUTPUT0"), rows_of(3, 4))
            assert np.array_equal((await low_a).as_numpy("OUTPUT0"), rows_of(1, 4))
            await wait_pending(batching_server, model, 1)
            assert not low_b.done()
            filler = await client.infer(model, slow_input(4, rows=5))
            assert np.array_equal(filler.as_numpy("OUTPUT0"), rows_of(4, 5))
            assert np.array_equal((await low_b).as_numpy("OUTPUT0"), rows_of(2, 3))
        finally:
            await client.close()

    asyncio.run(main())
    assert executions(statistics(batching_server, model)) == {8: 2}


def test_preserve_ordering_answers_a_stream_in_request_order(
    batching_server: ServerProcess,
) -> None:
    """Two instances finish batches in any order; the stream still answers in order."""
    model = "ordered"
    answers: queue.Queue[tuple[str, Any]] = queue.Queue()

    def on_answer(result: Any, error: Any) -> None:
        answers.put(("error", error) if error is not None else ("ok", result))

    count = 40
    with triton.InferenceServerClient(batching_server.url) as client:
        client.start_stream(callback=on_answer)
        try:
            for tag in range(count):
                client.async_stream_infer(
                    model, slow_input(tag, rows=1 + tag % 3), request_id=str(tag)
                )
            got = [answers.get(timeout=PATIENCE_S) for _ in range(count)]
        finally:
            client.stop_stream()
    assert [kind for kind, _ in got] == ["ok"] * count
    assert [result.get_response().id for _, result in got] == [str(t) for t in range(count)]
    for tag, (_, result) in enumerate(got):
        assert np.array_equal(result.as_numpy("OUTPUT0"), rows_of(tag, 1 + tag % 3))
    stats = statistics(batching_server, model)
    assert executed_rows(stats) == stats.inference_count == sum(1 + t % 3 for t in range(count))


def test_stream_requests_are_batched_together(batching_server: ServerProcess) -> None:
    model = "stream_hold"

    async def requests() -> Any:
        for tag in range(8):
            yield {"model_name": model, "inputs": slow_input(tag), "request_id": str(tag)}

    async def main() -> dict[str, Any]:
        client = triton_aio.InferenceServerClient(batching_server.url)
        got: dict[str, Any] = {}
        try:
            async for result, error in client.stream_infer(requests()):
                assert error is None, error
                got[result.get_response().id] = result
                if len(got) == 8:
                    break
        finally:
            await client.close()
        return got

    got = asyncio.run(asyncio.wait_for(main(), PATIENCE_S))
    for tag in range(8):
        assert np.array_equal(got[str(tag)].as_numpy("OUTPUT0"), rows_of(tag, 1))
    # All eight streamed requests went through the batcher as one batch.
    assert executions(statistics(batching_server, model)) == {8: 1}


def test_a_failing_request_fails_alone_and_its_batch_mates_succeed(
    batching_server: ServerProcess,
) -> None:
    """gather_fail batches exactly 4 requests; an INDEX of 7 makes ORT reject the batch."""
    model = "gather_fail"

    def request(tag: int, index: int) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name=model, id=str(tag))
        message.inputs.add(name="INPUT", datatype="FP32", shape=[1, 4])
        message.inputs.add(name="INDEX", datatype="INT64", shape=[1, 1])
        message.raw_input_contents.append((np.arange(4, dtype=np.float32) + 10 * tag).tobytes())
        message.raw_input_contents.append(np.array([index], np.int64).tobytes())
        return message

    async def main() -> None:
        async with grpc.aio.insecure_channel(batching_server.url) as channel:
            stub = service.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
            indices = {0: 0, 1: 3, 2: 7, 3: 1}  # tag -> INDEX; 7 is out of range
            calls = {tag: stub.ModelInfer(request(tag, i)) for tag, i in indices.items()}
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await calls[2]
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            for tag in (0, 1, 3):
                reply = await calls[tag]
                value = np.frombuffer(reply.raw_output_contents[0], np.float32)
                assert value.tolist() == [10 * tag + indices[tag]]
            # The queue keeps flowing: the next four good ones batch as usual.
            more = [stub.ModelInfer(request(tag, 2)) for tag in range(4, 8)]
            for tag, call in enumerate(more, start=4):
                reply = await call
                assert np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [
                    10 * tag + 2
                ]

    asyncio.run(main())
    stats = statistics(batching_server, model)
    # The merged batch of four failed; its three good requests re-ran one by one.
    assert executions(stats) == {1: 3, 4: 1}
    assert stats.inference_count == executed_rows(stats) == 7
    assert failures(batching_server, model, "INVALID_ARGUMENT") == 1


def test_two_instances_take_two_batches_at_once(batching_server: ServerProcess) -> None:
    """With 1 ms of queue timeout, a batch that had to wait for an instance would fail."""
    model = "two_instances"
    done: queue.Queue[tuple[Any, Any]] = queue.Queue()
    with triton.InferenceServerClient(batching_server.url) as client:
        for round_ in range(3):
            for tag in (2 * round_, 2 * round_ + 1):
                client.async_infer(
                    model,
                    slow_input(tag, rows=8),  # full: the two can never share a batch
                    callback=lambda result, error: done.put((result, error)),
                    request_id=str(tag),
                )
            for _ in range(2):
                result, error = done.get(timeout=PATIENCE_S)
                assert error is None, error
                tag = int(result.get_response().id)
                assert np.array_equal(result.as_numpy("OUTPUT0"), rows_of(tag, 8))
    stats = statistics(batching_server, model)
    assert executions(stats) == {8: 6}
    assert failures(batching_server, model, "DEADLINE_EXCEEDED") == 0
