"""Our generated protobuf code: up to date with protos/, and wire-compatible
with tritonclient's (same field names, numbers, types and labels)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tritonclient.grpc.model_config_pb2 as triton_config
import tritonclient.grpc.service_pb2 as triton_service
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from lockgate_client._proto import grpc_service_pb2, model_config_pb2

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_matches_protos() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _compare_enums(theirs: EnumDescriptor, ours: EnumDescriptor) -> list[str]:
    want = {v.name: v.number for v in theirs.values}
    have = {v.name: v.number for v in ours.values}
    return [] if want == have else [f"enum {theirs.full_name}: {want} != {have}"]


def _compare_messages(theirs: Descriptor, ours: Descriptor) -> list[str]:
    """Differences between two messages, recursively through nested types."""
    problems: list[str] = []
    for field in theirs.fields:
        mine = ours.fields_by_name.get(field.name)
        where = f"{theirs.full_name}.{field.name}"
        if mine is None:
            problems.append(f"{where}: missing")
            continue
        if (mine.number, mine.type) != (field.number, field.type):
            problems.append(
                f"{where}: number/type {(mine.number, mine.type)} != {(field.number, field.type)}"
            )
        if field.is_repeated != mine.is_repeated:
            problems.append(f"{where}: repeated {mine.is_repeated} != {field.is_repeated}")
        if (field.containing_oneof is None) != (mine.containing_oneof is None):
            problems.append(f"{where}: oneof membership differs")
        if field.message_type is not None:
            assert mine.message_type is not None
            if field.message_type.name != mine.message_type.name:
                problems.append(f"{where}: message type {mine.message_type.name}")
        if field.enum_type is not None:
            assert mine.enum_type is not None
            if field.enum_type.name != mine.enum_type.name:
                problems.append(f"{where}: enum type {mine.enum_type.name}")
    extra = set(ours.fields_by_name) - set(theirs.fields_by_name)
    if extra:
        problems.append(f"{theirs.full_name}: fields tritonclient lacks: {sorted(extra)}")
    for name, nested in theirs.nested_types_by_name.items():
        if name not in ours.nested_types_by_name:
            problems.append(f"{theirs.full_name}.{name}: nested message missing")
        else:
            problems += _compare_messages(nested, ours.nested_types_by_name[name])
    for name, enum in theirs.enum_types_by_name.items():
        if name not in ours.enum_types_by_name:
            problems.append(f"{theirs.full_name}.{name}: nested enum missing")
        else:
            problems += _compare_enums(enum, ours.enum_types_by_name[name])
    return problems


FILES = [
    pytest.param(triton_service.DESCRIPTOR, grpc_service_pb2.DESCRIPTOR, id="grpc_service"),
    pytest.param(triton_config.DESCRIPTOR, model_config_pb2.DESCRIPTOR, id="model_config"),
]


@pytest.mark.parametrize(("theirs", "ours"), FILES)
def test_messages_match_tritonclient(theirs: FileDescriptor, ours: FileDescriptor) -> None:
    assert theirs.message_types_by_name, "tritonclient has no messages?"
    problems: list[str] = []
    for name, message in theirs.message_types_by_name.items():
        if name not in ours.message_types_by_name:
            problems.append(f"message {name} missing")
            continue
        problems += _compare_messages(message, ours.message_types_by_name[name])
    for name, enum in theirs.enum_types_by_name.items():
        if name not in ours.enum_types_by_name:
            problems.append(f"enum {name} missing")
        else:
            problems += _compare_enums(enum, ours.enum_types_by_name[name])
    assert problems == []


def test_bytes_interchange_with_tritonclient() -> None:
    """A request serialized by either side parses identically on the other."""
    theirs = triton_service.ModelInferRequest(model_name="m", model_version="2", id="x")
    tensor = theirs.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    tensor.parameters["p"].int64_param = -3
    tensor.contents.fp32_contents.extend([1.5, -2.0])
    theirs.outputs.add(name="OUTPUT0").parameters["binary_data"].bool_param = True
    theirs.parameters["priority"].uint64_param = 2
    theirs.raw_input_contents.append(b"\x00\x01")
    ours = grpc_service_pb2.ModelInferRequest.FromString(theirs.SerializeToString())
    assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )
    assert ours.inputs[0].contents.fp32_contents[:] == [1.5, -2.0]
    assert ours.parameters["priority"].uint64_param == 2


def test_both_importable_in_one_process() -> None:
    """tritonclient registers `inference.*`; ours must not collide with it."""
    code = (
        "import tritonclient.grpc, tritonclient.grpc.aio\n"
        "from lockgate_client._proto import grpc_service_pb2, model_config_pb2\n"
        "from lockgate_client._proto import inference_service_pb2_grpc\n"
        "import lockgate_client\n"
        "import tritonclient.grpc.service_pb2 as t\n"
        "assert t.DESCRIPTOR.package != grpc_service_pb2.DESCRIPTOR.package\n"
        "import sys\n"
        "# The service descriptor would collide with tritonclient's: server-only.\n"
        "assert 'lockgate_client._proto.inference_service_pb2' not in sys.modules\n"
        "print('ok')\n"
    )
    env_path = [str(ROOT / "client"), str(ROOT / "server")]
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": ":".join(env_path)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
