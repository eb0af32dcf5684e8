"""The response cache: hits skip the batcher, are byte-equal to uncached answers,
show in statistics and metrics, and stay within their byte budget."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ServerProcess, launch_server, scrape

from lockgate.cache import ResponseCache, parse_cache_config
from lockgate.request import InferRequest
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from models.build import build_simple, build_simple_string

StartServer = Callable[..., ServerProcess]
CACHE_ON = "response_cache { enable: true }\n"


def _copy_model(repo: Path, source: str, name: str, extra: str) -> None:
    shutil.copytree(repo / source, repo / name)
    config = repo / name / "config.pbtxt"
    text = config.read_text().replace(f'name: "{source}"', f'name: "{name}"')
    config.write_text(text + extra)


def build_cache_repository(repo: Path) -> None:
    """``simple`` and ``simple_string`` plus copies of them with the cache on."""
    build_simple(repo)
    build_simple_string(repo)
    _copy_model(repo, "simple", "simple_cached", CACHE_ON)
    _copy_model(repo, "simple_string", "string_cached", CACHE_ON)


@pytest.fixture(scope="module")
def cache_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("cache-repo")
    build_cache_repository(repo)
    return repo


@pytest.fixture(scope="module")
def cache_server(
    cache_repo: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = launch_server(
        cache_repo, tmp_path_factory.mktemp("cache-logs"), "--response-cache-bytes", "1048576"
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def stub(cache_server: ServerProcess) -> Iterator[svc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(cache_server.url) as channel:
        yield svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _request(model: str, seed: int, outputs: list[str] | None = None) -> pb.ModelInferRequest:
    a = np.arange(seed, seed + 16, dtype=np.int32).reshape(1, 16)
    b = np.full((1, 16), seed % 7, dtype=np.int32)
    request = pb.ModelInferRequest(model_name=model, id=f"r{seed}")
    for name, value in (("INPUT0", a), ("INPUT1", b)):
        request.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        request.raw_input_contents.append(value.tobytes())
    for output in outputs or []:
        request.outputs.add(name=output)
    return request


def _string_request(model: str, seed: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name in ("INPUT0", "INPUT1"):
        tensor = request.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
        tensor.contents.bytes_contents.extend(str(seed + i).encode() for i in range(16))
    return request


def _stats(stub: svc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model))
    stats: pb.ModelStatistics = reply.model_stats[0]
    return stats


def _same_answer(cached: pb.ModelInferResponse, plain: pb.ModelInferResponse) -> None:
    assert list(cached.raw_output_contents) == list(plain.raw_output_contents)
    assert [(o.name, o.datatype, list(o.shape)) for o in cached.outputs] == [
        (o.name, o.datatype, list(o.shape)) for o in plain.outputs
    ]


def test_hits_are_byte_equal_and_skip_the_model(stub: svc.GRPCInferenceServiceStub) -> None:
    before = _stats(stub, "simple_cached")
    first = stub.ModelInfer(_request("simple_cached", 100))
    for _ in range(5):
        again = stub.ModelInfer(_request("simple_cached", 100))
        _same_answer(again, first)
        _same_answer(again, stub.ModelInfer(_request("simple", 100)))
        assert again.id == "r100"
    after = _stats(stub, "simple_cached")
    stats = after.inference_stats
    assert stats.cache_miss.count - before.inference_stats.cache_miss.count == 1
    assert stats.cache_hit.count - before.inference_stats.cache_hit.count == 5
    assert stats.cache_hit.ns > 0 and stats.cache_miss.ns > 0
    # As in Triton: hits are successes, but neither inferences nor executions.
    assert stats.success.count - before.inference_stats.success.count == 6
    assert after.inference_count - before.inference_count == 1
    assert after.execution_count - before.execution_count == 1


def test_inputs_and_requested_outputs_are_part_of_the_key(
    stub: svc.GRPCInferenceServiceStub,
) -> None:
    before = _stats(stub, "simple_cached").inference_stats
    one = stub.ModelInfer(_request("simple_cached", 200))
    other = stub.ModelInfer(_request("simple_cached", 201))
    assert one.raw_output_contents != other.raw_output_contents
    only = stub.ModelInfer(_request("simple_cached", 200, ["OUTPUT1"]))
    assert [o.name for o in only.outputs] == ["OUTPUT1"]
    assert only.raw_output_contents[0] == one.raw_output_contents[1]
    only_again = stub.ModelInfer(_request("simple_cached", 200, ["OUTPUT1"]))
    _same_answer(only_again, only)
    after = _stats(stub, "simple_cached").inference_stats
    assert after.cache_miss.count - before.cache_miss.count == 3
    assert after.cache_hit.count - before.cache_hit.count == 1


def test_bytes_tensors_are_cached_exactly(stub: svc.GRPCInferenceServiceStub) -> None:
    first = stub.ModelInfer(_string_request("string_cached", 5))
    second = stub.ModelInfer(_string_request("string_cached", 5))
    _same_answer(second, first)
    _same_answer(second, stub.ModelInfer(_string_request("simple_string", 5)))
    assert _stats(stub, "string_cached").inference_stats.cache_hit.count >= 1


def test_models_without_the_cache_are_not_cached(stub: svc.GRPCInferenceServiceStub) -> None:
    for _ in range(3):
        stub.ModelInfer(_request("simple", 300))
    stats = _stats(stub, "simple").inference_stats
    assert stats.cache_hit.count == 0 and stats.cache_miss.count == 0


def test_tritonclient_sees_cached_answers(cache_server: ServerProcess) -> None:
    with tc.InferenceServerClient(cache_server.url) as client:
        inputs = [tc.InferInput(f"INPUT{i}", [1, 16], "INT32") for i in range(2)]
        a = np.arange(16, dtype=np.int32).reshape(1, 16)
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a)
        for _ in range(2):
            result = client.infer("simple_cached", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a * 2)
        stats = client.get_inference_statistics("simple_cached").model_stats[0]
        assert stats.inference_stats.cache_hit.count >= 1


def test_metrics_report_hits_and_misses(
    cache_server: ServerProcess, stub: svc.GRPCInferenceServiceStub
) -> None:
    stub.ModelInfer(_request("simple_cached", 400))
    stub.ModelInfer(_request("simple_cached", 400))
    stats = _stats(stub, "simple_cached").inference_stats
    text = scrape(cache_server)
    labels = '{model="simple_cached",version="1"}'
    assert f"nv_cache_num_hits_per_model{labels} {float(stats.cache_hit.count)}" in text
    assert f"nv_cache_num_misses_per_model{labels} {float(stats.cache_miss.count)}" in text
    assert f"nv_cache_hit_duration_per_model{labels}" in text
    assert f"nv_cache_miss_duration_per_model{labels}" in text
    assert 'nv_cache_num_hits_per_model{model="simple",' not in text
    assert "nv_cache_num_entries " in text and "nv_cache_util " in text


def test_a_small_cache_evicts_the_least_recently_used(
    cache_repo: Path, start_server: StartServer
) -> None:
    # Each entry of simple_cached holds 2 x 64 bytes of outputs plus overhead:
    # room for two entries, not three.
    proc = start_server(cache_repo, "--cache-config", "local,size=900")
    with grpc.insecure_channel(proc.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for seed in (1, 2, 1, 3):  # 3 evicts 2, the least recently used
            stub.ModelInfer(_request("simple_cached", seed))
        stub.ModelInfer(_request("simple_cached", 1))
        hits = _stats(stub, "simple_cached").inference_stats.cache_hit.count
        assert hits == 2
        stub.ModelInfer(_request("simple_cached", 2))
        stats = _stats(stub, "simple_cached").inference_stats
        assert stats.cache_hit.count == 2 and stats.cache_miss.count == 4
        text = scrape(proc)
        assert "nv_cache_num_evictions 2.0" in text
        assert "nv_cache_num_entries 2.0" in text


def test_model_cache_without_server_cache_serves_uncached(
    cache_repo: Path, start_server: StartServer
) -> None:
    proc = start_server(cache_repo)
    with grpc.insecure_channel(proc.url) as channel:
        stub = svc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
        for _ in range(2):
            stub.ModelInfer(_request("simple_cached", 7))
        assert _stats(stub, "simple_cached").inference_stats.cache_hit.count == 0
    assert "enables response_cache but the server has none" in proc.log()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("redis,host=x", "only the 'local' cache"),
        ("local,size=lots", "size must be a number"),
        ("local,limit=5", "unknown setting"),
    ],
)
def test_bad_cache_config_is_refused(flag: str, message: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lockgate", "serve", str(tmp_path), "--cache-config", flag],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_parse_cache_config() -> None:
    assert parse_cache_config("local,size=1048576") == 1048576
    with pytest.raises(ValueError, match="give the size"):
        parse_cache_config("local")


# --- keys, property-based ------------------------------------------------------------------


def _decoded(arrays: dict[str, Any], outputs: list[str] | None = None) -> InferRequest:
    return InferRequest(inputs=arrays, rows=1, outputs=outputs, shape_key=())


arrays = st.lists(st.integers(-(2**31), 2**31 - 1), min_size=1, max_size=8).map(
    lambda values: np.array(values, dtype=np.int32)
)


@settings(deadline=None)
@given(arrays, arrays)
def test_keys_differ_exactly_when_requests_do(a: Any, b: Any) -> None:
    key_a = ResponseCache.key("m", "1", _decoded({"X": a}))
    key_b = ResponseCache.key("m", "1", _decoded({"X": b}))
    assert (key_a == key_b) == (a.shape == b.shape and bool(np.array_equal(a, b)))
    assert key_a != ResponseCache.key("m", "2", _decoded({"X": a}))
    assert key_a != ResponseCache.key("m", "1", _decoded({"Y": a}))
    assert key_a != ResponseCache.key("m", "1", _decoded({"X": a.astype(np.int64)}))
    assert key_a != ResponseCache.key("m", "1", _decoded({"X": a}, ["OUT"]))


def test_entries_larger_than_the_cache_are_not_stored() -> None:
    cache = ResponseCache(100)
    cache.insert(b"k", {"OUT": np.zeros(1000, np.float32)})
    assert len(cache) == 0 and cache.used_bytes == 0
    assert cache.lookup(b"k") is None
