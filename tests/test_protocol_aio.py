"""tritonclient's asyncio client, and bidirectional streaming (sync and aio).

Streaming answers arrive as soon as each request is done, not in order, so
the tests match them by request id. Errors on a stream are in-band: the
stream carries on after a bad request.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tca
from support import ServerProcess, simple_inputs
from tritonclient.utils import InferenceServerException

from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc

Array = npt.NDArray[Any]
StreamItem = tuple[tc.InferResult | None, InferenceServerException | None]


def row(i: int) -> Array:
    return np.arange(i, i + 16, dtype=np.int32).reshape(1, 16)


def output(result: tc.InferResult, name: str) -> Array:
    array: Array | None = result.as_numpy(name)
    assert array is not None, f"no output {name}"
    return array


# --- asyncio client ----------------------------------------------------------------------


def test_aio_health_and_metadata(server: ServerProcess) -> None:
    async def main() -> None:
        client = tca.InferenceServerClient(server.url)
        try:
            assert await client.is_server_live()
            assert await client.is_server_ready()
            assert await client.is_model_ready("simple")
            assert not await client.is_model_ready("broken")
            metadata = await client.get_server_metadata()
            assert metadata.name == "lockgate"
            model = await client.get_model_metadata("simple")
            assert model.platform == "onnxruntime_onnx"
            config = await client.get_model_config("simple")
            assert config.config.max_batch_size == 8
            index = await client.get_model_repository_index()
            assert "simple" in {m.name for m in index.models}
        finally:
            await client.close()

    asyncio.run(main())


def test_aio_concurrent_requests_get_their_own_answers(server: ServerProcess) -> None:
    """Concurrent requests may share a batch; each gets back its own rows."""

    async def main() -> None:
        client = tca.InferenceServerClient(server.url)
        try:
            results = await asyncio.gather(
                *(
                    client.infer("simple", simple_inputs(row(i), row(0)), request_id=str(i))
                    for i in range(24)
                )
            )
        finally:
            await client.close()
        for i, result in enumerate(results):
            assert result.get_response().id == str(i)
            np.testing.assert_array_equal(output(result, "OUTPUT0"), row(i) + row(0))
            np.testing.assert_array_equal(output(result, "OUTPUT1"), row(i) - row(0))

    asyncio.run(main())


def test_aio_error_status(server: ServerProcess) -> None:
    async def main() -> None:
        client = tca.InferenceServerClient(server.url)
        try:
            try:
                await client.infer("simple", simple_inputs(row(0), row(0))[:1])
            except InferenceServerException as error:
                assert error.status() == "StatusCode.INVALID_ARGUMENT"
                assert "INPUT1" in (error.message() or "")
            else:
                raise AssertionError("a request missing INPUT1 succeeded")
        finally:
            await client.close()

    asyncio.run(main())


# --- streaming: aio -------------------------------------------------------------------------


def test_aio_stream_infer(server: ServerProcess) -> None:
    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(8):
            yield {
                "model_name": "simple",
                "inputs": simple_inputs(row(i), row(1)),
                "request_id": f"r{i}",
            }
        yield {"model_name": "nobatch_missing", "inputs": simple_inputs(row(0), row(0))}
        yield {"model_name": "simple", "inputs": simple_inputs(row(9), row(1)), "request_id": "r9"}

    async def main() -> list[StreamItem]:
        client = tca.InferenceServerClient(server.url)
        try:
            items: list[StreamItem] = []
            async for item in client.stream_infer(requests()):
                items.append(item)
            return items
        finally:
            await client.close()

    items = asyncio.run(main())
    assert len(items) == 10
    errors = [e for r, e in items if e is not None]
    assert len(errors) == 1
    assert "[NOT_FOUND]" in str(errors[0])
    assert "nobatch_missing" in str(errors[0])
    results = {r.get_response().id: r for r, e in items if r is not None}
    assert set(results) == {f"r{i}" for i in (*range(8), 9)}
    for request_id, result in results.items():
        i = int(request_id[1:])
        np.testing.assert_array_equal(output(result, "OUTPUT0"), row(i) + row(1))


# --- streaming: sync --------------------------------------------------------------------


def test_sync_stream_infer(server: ServerProcess) -> None:
    answers: queue.Queue[StreamItem] = queue.Queue()

    def callback(result: tc.InferResult | None, error: InferenceServerException | None) -> None:
        answers.put((result, error))

    with tc.InferenceServerClient(server.url) as client:
        client.start_stream(callback=callback)
        try:
            for i in range(6):
                client.async_stream_infer(
                    "simple", simple_inputs(row(i), row(2)), request_id=f"s{i}"
                )
            bad = simple_inputs(row(0), row(0))
            client.async_stream_infer("simple", bad[:1], request_id="bad")
            items = [answers.get(timeout=30) for _ in range(7)]
        finally:
            client.stop_stream()
    errors = [e for _, e in items if e is not None]
    assert len(errors) == 1
    assert "[INVALID_ARGUMENT]" in str(errors[0])
    assert "INPUT1" in str(errors[0])
    results = {r.get_response().id: r for r, _ in items if r is not None}
    assert set(results) == {f"s{i}" for i in range(6)}
    for request_id, result in results.items():
        i = int(request_id[1:])
        np.testing.assert_array_equal(output(result, "OUTPUT1"), row(i) - row(2))


def test_stream_error_carries_request_id(server: ServerProcess) -> None:
    """tritonclient drops it, but the wire answer says which request failed."""
    request = pb.ModelInferRequest(model_name="nope", id="which-one")
    with grpc.insecure_channel(server.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        (response,) = list(stub.ModelStreamInfer(iter([request]), timeout=30))
    assert response.error_message.startswith("[NOT_FOUND]")
    assert response.infer_response.id == "which-one"
    assert response.infer_response.model_name == "nope"


def _slow_request(i: int) -> pb.ModelInferRequest:
    data = np.full((1, 256), i, dtype=np.float32)
    return pb.ModelInferRequest(
        model_name="slow",
        id=f"slow{i}",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="INPUT0", datatype="FP32", shape=[1, 256])
        ],
        raw_input_contents=[data.tobytes()],
    )


def test_server_survives_client_leaving_mid_stream(server: ServerProcess) -> None:
    """A client that goes away with requests in flight must not hurt the server."""
    release = threading.Event()

    def requests() -> Iterator[pb.ModelInferRequest]:
        for i in range(6):
            yield _slow_request(i)
        release.wait(30)  # keep the request side open until the client leaves

    channel = grpc.insecure_channel(server.url)
    stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    call = stub.ModelStreamInfer(requests(), timeout=60)
    first = next(call)
    assert first.error_message == ""
    assert first.infer_response.id.startswith("slow")
    call.cancel()
    channel.close()
    release.set()

    # A second client leaves before reading anything at all.
    channel = grpc.insecure_channel(server.url)
    stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    abandoned = stub.ModelStreamInfer(iter([_slow_request(i) for i in range(4)]), timeout=60)
    abandoned.cancel()
    channel.close()

    with tc.InferenceServerClient(server.url) as client:
        assert client.is_server_live()
        result = client.infer("simple", simple_inputs(row(3), row(1)))
        np.testing.assert_array_equal(output(result, "OUTPUT0"), row(3) + row(1))
        tensor = tc.InferInput("INPUT0", [1, 256], "FP32")
        tensor.set_data_from_numpy(np.full((1, 256), 7, dtype=np.float32))
        slow = output(client.infer("slow", [tensor]), "OUTPUT0")
        np.testing.assert_array_equal(slow, np.full((1, 256), 7, dtype=np.float32))
