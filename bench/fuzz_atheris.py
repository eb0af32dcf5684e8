"""Coverage-guided fuzzing of a live Lockgate server with atheris (libFuzzer).

``make fuzz`` runs it for ``FUZZ_SECONDS`` after the long hypothesis pass of
tests/test_fuzz.py. It starts ``lockgate serve`` on a free loopback port in
``--model-control-mode explicit`` with the example models, plus ``fuzzed`` (a
copy of ``simple`` whose config the fuzzer rewrites), seeds libFuzzer with
valid requests for every example model, and sends each input it generates to
the server. The input's first byte says what the rest is:

* ``0-3``: a serialized ``ModelInferRequest``, sent to ``ModelInfer`` as bytes
  with no serializer in between (so it need not even parse);
* ``4-5``: the messages of one ``ModelStreamInfer`` stream, each a 2-byte
  little-endian length and that many bytes, up to 8; a valid request follows
  them, and its answer must be right whenever the stream stays open;
* ``6-7``: a JSON model config for ``RepositoryModelLoad`` of ``fuzzed``; when
  the load succeeds, a valid request to the reloaded model follows.

Every ``--check-every`` inputs (default 25) a valid request to ``simple`` must
be answered correctly and the server's log must hold no traceback.

**A finding** is raised as an exception, so libFuzzer prints it (with the
status code and message, or the log lines), saves the input as
``crash-<sha1>`` under ``-artifact_prefix`` (default
``bench/results/fuzz-artifacts/``) and exits non-zero. Findings are:

* ``INTERNAL`` or ``UNKNOWN``, as a status or a stream's in-band error, or any
  message that says "internal error" (a bug the server caught and reported)
  unless the input itself holds those words (messages echo names sent);
* an error status with no message;
* no answer within 30 s (a hang, or work without bound);
* the server process gone, or a traceback or "internal error in" (the
  servicer's report of an unexpected exception) in its log;
* an OK answer the SDK cannot decode; a stream that ends OK with answers
  missing;
* the periodic valid request (or the one in each stream) failing or wrong.

Replay a finding with ``python bench/fuzz_atheris.py <crash file>``.

**Coverage guidance is limited.** atheris instruments Python bytecode in this
process only; the server is another process, so libFuzzer sees none of the
server's code. What it does see is this harness decoding each input the way
the server would: the SDK's Python tensor decoding (``lockgate_client``,
imported under ``atheris.instrument_imports``), protobuf's pure-Python JSON
parser for configs, the harness's own walk over the decoded request, and one
branch per status code the server answers with. Protobuf's binary parser is C
(upb) and invisible. So inputs are kept for being structurally new on the
client side or for drawing a new kind of answer, not for reaching new server
code; a ``-dict`` of field names, datatypes and config keys makes up some of
the difference.

It runs as two processes: this one builds the models, starts and watches the
server, and checks it once more after fuzzing; a child of it runs libFuzzer,
which exits straight from C (so nothing after ``atheris.Fuzz()`` would run).

Usage::

    python bench/fuzz_atheris.py -max_total_time=300
    python bench/fuzz_atheris.py --repository models/repository -runs=200 -seed=1
    python bench/fuzz_atheris.py bench/results/fuzz-artifacts/crash-<sha1>

Options with ``--`` are the harness's (see ``--help``); everything else
(``-flag=value`` and input files or corpus directories) goes to libFuzzer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import atheris
import grpc
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.serving import free_port, wait_ready  # noqa: E402

# Only modules first imported inside this block are instrumented: nothing
# above may import protobuf or the SDK (models.build, via onnx, would).
with atheris.instrument_imports(include=["lockgate_client", "google.protobuf"]):
    from google.protobuf import json_format, text_format
    from google.protobuf.message import DecodeError

    from lockgate_client._proto import grpc_service_pb2 as pb
    from lockgate_client._proto import model_config_pb2 as mc
    from lockgate_client.codec import decode_outputs, decode_tensor
    from lockgate_client.datatypes import CONTENTS_FIELD, WIRE_DTYPES

SERVICE = "/inference.GRPCInferenceService/"
EXAMPLE_MODELS = ("simple", "simple_string", "mlp", "image_classifier")
#: The model whose config the fuzzer rewrites; the checks use ``simple``, untouched.
CONFIG_MODEL = "fuzzed"
BUG_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
#: Longer than any honest answer to a small request; past it is a hang.
TIMEOUT_S = 30.0
#: A fuzzed config may legitimately hold requests back (queue delays): its
#: probe may time out, and is given less time.
PROBE_TIMEOUT_S = 5.0
CHECK_ID = "lockgate-fuzz-check"
MAX_FRAMES = 8
INFER, STREAM, CONFIG = "infer", "stream", "config"
#: What an input's first byte selects, modulo the length.
MODES = (INFER, INFER, INFER, INFER, STREAM, STREAM, CONFIG, CONFIG)
SEED_BYTE = {INFER: 0, STREAM: 4, CONFIG: 6}
CHILD_ENV = "LOCKGATE_ATHERIS_CHILD"
#: Log lines only a bug writes. Anchored: log lines also quote what clients
#: sent (ids, model names), which may hold any words.
LOG_ALARMS = re.compile(
    r"^Traceback \(most recent call last\):|^\S+ \S+ ERROR +lockgate\.servicer: internal error in "
)
BUG_WORDS = "internal error"

Tensor = pb.ModelInferRequest.InferInputTensor


class Finding(Exception):
    """Something the server must never do; libFuzzer reports it and saves the input."""


# --- requests ----------------------------------------------------------------------------------


def check_request(model: str = "simple") -> pb.ModelInferRequest:
    """The valid request whose answer is verified: ``simple``'s a + b and a - b."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    return pb.ModelInferRequest(
        model_name=model,
        id=CHECK_ID,
        inputs=[
            Tensor(name="INPUT0", datatype="INT32", shape=[1, 16]),
            Tensor(name="INPUT1", datatype="INT32", shape=[1, 16]),
        ],
        raw_input_contents=[a.tobytes(), (a + 3).tobytes()],
    )


def check_answer(response: pb.ModelInferResponse, every_output: bool = True) -> str | None:
    """Why ``response`` is not the right answer to ``check_request``; None if it is.

    ``every_output=False`` accepts a subset of the outputs: a fuzzed config may
    list only some of them, and then only those are served.
    """
    try:
        outputs = decode_outputs(response)
    except Exception as exc:  # the SDK's own errors and numpy's: all mean "wrong"
        return f"the answer does not decode: {exc}"
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    expected = {"OUTPUT0": 2 * a + 3, "OUTPUT1": np.full_like(a, -3)}
    names = sorted(outputs)
    if set(names) - set(expected) or not names or (every_output and len(names) < 2):
        return f"outputs {names} instead of OUTPUT0 and OUTPUT1"
    wrong = [f"{n} {v.tolist()}" for n, v in outputs.items() if not np.array_equal(v, expected[n])]
    return f"wrong values: {', '.join(wrong)}" if wrong else None


def _tensor(name: str, datatype: str, array: np.ndarray[Any, Any]) -> tuple[Tensor, bytes]:
    spec = Tensor(name=name, datatype=datatype, shape=array.shape)
    if datatype == "BYTES":
        return spec, b"".join(struct.pack("<I", len(s)) + s for s in array.reshape(-1))
    return spec, array.tobytes()


def _request(model: str, *tensors: tuple[Tensor, bytes]) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(
        model_name=model,
        inputs=[t[0] for t in tensors],
        raw_input_contents=[t[1] for t in tensors],
    )


def seed_requests() -> dict[str, pb.ModelInferRequest]:
    """A valid request per example model (and per way of sending one): the seeds."""
    ints = np.arange(32, dtype=np.int32).reshape(2, 16)
    texts = np.array([str(i).encode() for i in range(16)], dtype=object).reshape(1, 16)
    typed = pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            Tensor(
                name=f"INPUT{i}",
                datatype="INT32",
                shape=[1, 16],
                contents=pb.InferTensorContents(int_contents=list(range(16))),
            )
            for i in range(2)
        ],
    )
    some_outputs = _request(
        "simple", _tensor("INPUT0", "INT32", ints), _tensor("INPUT1", "INT32", ints)
    )
    some_outputs.outputs.add(name="OUTPUT1")
    some_outputs.id = "1"
    return {
        "simple": _request(
            "simple", _tensor("INPUT0", "INT32", ints), _tensor("INPUT1", "INT32", ints)
        ),
        "simple_typed": typed,
        "simple_outputs": some_outputs,
        "simple_string": _request(
            "simple_string", _tensor("INPUT0", "BYTES", texts), _tensor("INPUT1", "BYTES", texts)
        ),
        "mlp": _request("mlp", _tensor("INPUT", "FP32", np.ones((1, 512), np.float32))),
        "image_classifier": _request(
            "image_classifier",
            _tensor("INPUT", "FP32", np.zeros((1, 3, 224, 224), np.float32)),
        ),
    }


def join_frames(messages: Iterable[bytes]) -> bytes:
    """The stream-mode encoding that ``split_frames`` reads back."""
    return b"".join(struct.pack("<H", len(m)) + m for m in messages)


def split_frames(data: bytes) -> list[bytes]:
    """Cut a stream-mode payload into messages: length-prefixed, the last one takes the rest."""
    frames: list[bytes] = []
    while len(data) >= 2 and len(frames) < MAX_FRAMES - 1:
        (length,) = struct.unpack_from("<H", data)
        frames.append(data[2 : 2 + length])
        data = data[2 + length :]
    if data:
        frames.append(data)
    return frames


def seed_configs(simple_config: mc.ModelConfig) -> list[str]:
    """JSON configs for ``fuzzed``: its own, and variations that load."""
    own = mc.ModelConfig()
    own.CopyFrom(simple_config)
    own.name = CONFIG_MODEL
    batching = {
        "max_batch_size": 4,
        "dynamic_batching": {
            "preferred_batch_size": [2, 4],
            "max_queue_delay_microseconds": 100,
            "priority_levels": 2,
            "default_priority_level": 1,
            "default_queue_policy": {"max_queue_size": 8, "timeout_action": "DELAY"},
        },
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    }
    warmup = {
        "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_INT32", "dims": [16]}],
        "model_warmup": [
            {
                "name": "w",
                "batch_size": 1,
                "inputs": {
                    "INPUT0": {"data_type": "TYPE_INT32", "dims": [16], "zero_data": True},
                    "INPUT1": {"data_type": "TYPE_INT32", "dims": [16], "random_data": True},
                },
            }
        ],
        "version_policy": {"specific": {"versions": [1]}},
        "parameters": {"intra_op_thread_count": {"string_value": "1"}},
    }
    return [
        json_format.MessageToJson(own, indent=None),
        "{}",
        json.dumps(batching),
        json.dumps(warmup),
    ]


def dictionary_tokens() -> list[str]:
    """Words libFuzzer splices in: field and enum names of configs and requests."""
    tokens: set[str] = set()

    def walk(descriptor: Any, seen: set[str]) -> None:
        if descriptor.full_name in seen:
            return
        seen.add(descriptor.full_name)
        for field in descriptor.fields:
            tokens.update({f'"{field.name}":', f'"{field.json_name}":'})
            if field.enum_type is not None:
                tokens.update(f'"{v.name}"' for v in field.enum_type.values)
            if field.message_type is not None:
                walk(field.message_type, seen)

    walk(mc.ModelConfig.DESCRIPTOR, set())
    tokens.update(WIRE_DTYPES)
    tokens.update([*EXAMPLE_MODELS, CONFIG_MODEL, "INPUT", "INPUT0", "INPUT1", "OUTPUT0"])
    tokens.update(["priority", "timeout", "binary_data_output", "sequence_id", "classification"])
    tokens.update(["-1", "0", "2147483648", "18446744073709551615", "1e308", "null", "[]"])
    return sorted(tokens)


def dictionary_line(token: str) -> str:
    """One entry of a libFuzzer dictionary: quoted, with \\, " and non-ASCII escaped."""
    out = []
    for byte in token.encode():
        char = chr(byte)
        if char in '\\"' or not 0x20 <= byte < 0x7F:
            out.append(f"\\x{byte:02X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


# --- coverage: decode as the server would ------------------------------------------------------


@atheris.instrument_func
def describe_request(data: bytes) -> pb.ModelInferRequest | None:
    """Decode ``data`` like the server does, so that libFuzzer sees its structure.

    Guidance only: what this finds wrong with the request is the server's to
    say, so every error here is swallowed.
    """
    try:
        request = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        return None
    raws = list(request.raw_input_contents)
    for index, tensor in enumerate(request.inputs):
        shape = list(tensor.shape)
        if any(d < 0 for d in shape):
            continue
        if index < len(raws):
            try:
                decode_tensor(tensor.datatype, shape, raws[index])
            except Exception:  # any complaint: the server's to make, not ours
                continue
        elif tensor.HasField("contents"):
            field = CONTENTS_FIELD.get(tensor.datatype)
            if field is not None and len(getattr(tensor.contents, field)) == math.prod(shape):
                continue
    for value in request.parameters.values():
        value.WhichOneof("parameter_choice")
    for requested in request.outputs:
        for value in requested.parameters.values():
            value.WhichOneof("parameter_choice")
    return request


@atheris.instrument_func
def describe_config(text: str) -> None:
    """Parse a JSON config with protobuf's Python parser, as the server will: guidance only."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except Exception:  # ParseError, JSONDecodeError, RecursionError...: the server's to judge
        return
    # Branches on what the server's validation refuses: configs that get past
    # each one are new coverage.
    dims = [list(t.dims) for t in config.input] + [list(t.dims) for t in config.output]
    if any(d < -1 or d == 0 for shape in dims for d in shape):
        return
    for group in config.instance_group:
        if group.count < 0:
            return
    for sample in config.model_warmup:
        for warmup in sample.inputs.values():
            if any(d <= 0 for d in warmup.dims):
                return


@atheris.instrument_func
def feedback(code: grpc.StatusCode) -> None:
    """One branch per answer: an input that draws a new kind of answer is new coverage."""
    if code is grpc.StatusCode.OK:
        return
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return
    if code is grpc.StatusCode.NOT_FOUND:
        return
    if code is grpc.StatusCode.UNAVAILABLE:
        return
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return
    if code is grpc.StatusCode.OUT_OF_RANGE:
        return
    if code is grpc.StatusCode.UNIMPLEMENTED:
        return
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return
    return


def in_band_code(message: str) -> grpc.StatusCode | None:
    """The code in front of a stream's in-band error ("[INVALID_ARGUMENT] ...")."""
    name = message[1:].partition("]")[0] if message.startswith("[") else ""
    return getattr(grpc.StatusCode, name, None) if name.isupper() else None


# --- the fuzzing process -----------------------------------------------------------------------


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (dead, not yet reaped by its parent) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self").exists():
            return False
    except OSError:
        pass
    else:
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Target:
    """The live server as the fuzzer sees it: one input at a time, judged."""

    def __init__(self, url: str, pid: int, log_path: Path, check_every: int) -> None:
        self.pid = pid
        self.log_path = log_path
        self.log_offset = 0
        self.check_every = check_every
        self.inputs = 0
        unlimited = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(url, options=unlimited)
        # No serializers: the fuzzed bytes go out exactly as generated.
        self.infer = self.channel.unary_unary(SERVICE + "ModelInfer", None, None)
        self.stream = self.channel.stream_stream(SERVICE + "ModelStreamInfer", None, None)
        self.load = self.channel.unary_unary(
            SERVICE + "RepositoryModelLoad", pb.RepositoryModelLoadRequest.SerializeToString, None
        )
        self.check_bytes = check_request().SerializeToString()
        self.probe_bytes = check_request(CONFIG_MODEL).SerializeToString()

    def test_one_input(self, data: bytes) -> None:
        """libFuzzer's entry point: send ``data`` as its first byte says; judge the answer."""
        if not data:
            return
        self.inputs += 1
        mode, payload = MODES[data[0] % len(MODES)], data[1:]
        if mode == INFER:
            self.fuzz_infer(payload)
        elif mode == STREAM:
            self.fuzz_stream(payload)
        else:
            self.fuzz_config(payload)
        if self.inputs % self.check_every == 0:
            self.check_serving()

    # --- the three kinds of input ---

    def fuzz_infer(self, payload: bytes) -> None:
        describe_request(payload)
        try:
            reply = self.infer(payload, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            self.judge(error, "ModelInfer", payload)
            return
        feedback(grpc.StatusCode.OK)
        self.check_decodes(reply, "ModelInfer")

    def fuzz_stream(self, payload: bytes) -> None:
        frames = split_frames(payload)
        parsed = [describe_request(frame) for frame in frames]
        messages = [*frames, self.check_bytes]
        answers: list[pb.ModelStreamInferResponse] = []
        try:
            for raw in self.stream(iter(messages), timeout=TIMEOUT_S):
                answers.append(pb.ModelStreamInferResponse.FromString(raw))
        except grpc.RpcError as error:
            self.judge(error, "ModelStreamInfer", payload)
            ended_ok = False
        else:
            feedback(grpc.StatusCode.OK)
            ended_ok = True
        for answer in answers:
            self.judge_stream_answer(answer, payload)
        if len(answers) > len(messages) or (ended_ok and len(answers) < len(messages)):
            raise Finding(
                f"ModelStreamInfer ended {'OK' if ended_ok else 'with an error'} after "
                f"{len(answers)} answers to {len(messages)} messages"
            )
        if any(request is not None and request.id == CHECK_ID for request in parsed):
            return  # a fuzzed message took the check's id: its answer is not ours to judge
        for answer in answers:
            if answer.infer_response.id != CHECK_ID:
                continue
            if answer.error_message:
                raise Finding(f"the valid request in a stream failed: {answer.error_message}")
            wrong = check_answer(answer.infer_response)
            if wrong:
                raise Finding(f"the valid request in a stream was answered wrongly: {wrong}")

    def fuzz_config(self, payload: bytes) -> None:
        # Protobuf strings must be UTF-8: invalid bytes become U+FFFD.
        text = payload.decode("utf-8", "replace")
        describe_config(text)
        request = pb.RepositoryModelLoadRequest(model_name=CONFIG_MODEL)
        request.parameters["config"].string_param = text
        try:
            self.load(request, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            self.judge(error, "RepositoryModelLoad", payload)
            return
        feedback(grpc.StatusCode.OK)
        # The config loaded: the model it describes must serve, or refuse politely.
        try:
            reply = self.infer(self.probe_bytes, timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # queue delays may be long
                self.judge(error, f"ModelInfer of {CONFIG_MODEL} after its config loaded", payload)
            return
        wrong = check_answer(pb.ModelInferResponse.FromString(reply), every_output=False)
        if wrong:
            raise Finding(f"{CONFIG_MODEL} answered wrongly after its config loaded: {wrong}")

    # --- judging ---

    def judge(self, error: grpc.RpcError, what: str, sent: bytes) -> None:
        """An error status: fine if it blames the request; a Finding if it is a bug's.

        ``sent`` is the input: a message may quote it, so words it holds prove nothing.
        """
        code: grpc.StatusCode = error.code()
        details: str = error.details() or ""
        feedback(code)
        if code in BUG_CODES or bug_words(details, sent):
            raise Finding(f"{what} answered {code.name}: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.check_alive()
            raise Finding(f"{what} got no answer in {TIMEOUT_S:.0f} s: {details}")
        if code == grpc.StatusCode.UNAVAILABLE:
            self.check_alive()  # also what a dead server's callers see
        if not details:
            raise Finding(f"{what} answered {code.name} with no message")

    def judge_stream_answer(self, answer: pb.ModelStreamInferResponse, sent: bytes) -> None:
        message = answer.error_message
        if not message:
            feedback(grpc.StatusCode.OK)
            self.check_decodes(answer.infer_response.SerializeToString(), "ModelStreamInfer")
            return
        code = in_band_code(message)
        if code is None:
            raise Finding(f"a stream's in-band error has no [CODE] in front: {message}")
        feedback(code)
        if code in BUG_CODES or bug_words(message, sent):
            raise Finding(f"ModelStreamInfer answered in band: {message}")

    def check_decodes(self, reply: bytes, what: str) -> None:
        try:
            decode_outputs(pb.ModelInferResponse.FromString(reply))
        except Exception as exc:  # the SDK's ProtocolError, numpy's ValueError...
            raise Finding(f"{what} answered OK with outputs the SDK cannot decode: {exc}") from None

    def check_alive(self) -> None:
        if not process_alive(self.pid):
            raise Finding(f"the server (pid {self.pid}) is gone; its log: {self.log_path}")

    def check_serving(self) -> None:
        """The server lives, answers a valid request rightly, and logged no bug."""
        self.check_alive()
        try:
            reply = self.infer(self.check_bytes, timeout=TIMEOUT_S)
        except grpc.RpcError as error:
            raise Finding(
                f"a valid request failed after {self.inputs} inputs: "
                f"{error.code().name}: {error.details()}"
            ) from None
        wrong = check_answer(pb.ModelInferResponse.FromString(reply))
        if wrong:
            raise Finding(
                f"a valid request was answered wrongly after {self.inputs} inputs: {wrong}"
            )
        self.scan_log()

    def scan_log(self) -> None:
        with self.log_path.open("rb") as log:
            log.seek(self.log_offset)
            new = log.read()
        self.log_offset += len(new)
        alarms = log_alarms(new.decode(errors="replace"))
        if alarms:
            raise Finding("the server logged a bug:\n" + "\n".join(alarms))


def bug_words(message: str, sent: bytes) -> bool:
    """Whether ``message`` reports a bug in words the client did not send."""
    return BUG_WORDS in message and BUG_WORDS.encode() not in sent


def log_alarms(text: str) -> list[str]:
    """The lines of a server log that only a bug writes, with a few lines of context."""
    lines = text.splitlines()
    hits = [i for i, line in enumerate(lines) if LOG_ALARMS.search(line)]
    return [line for i in hits[:3] for line in lines[max(0, i - 2) : i + 12]]


def run_child(settings: dict[str, Any], libfuzzer_argv: list[str]) -> None:
    """The fuzzing process: never returns (libFuzzer exits)."""
    target = Target(
        settings["url"], settings["pid"], Path(settings["log"]), settings["check_every"]
    )
    target.check_serving()
    atheris.Setup([sys.argv[0], *libfuzzer_argv], target.test_one_input)
    atheris.Fuzz()


# --- the supervising process: models, server, seeds ----------------------------------------------

#: Run as ``python -c TRAMPOLINE PARENT_PID DATA_LIMIT COMMAND...``: what it
#: starts dies with this process even when that is killed outright, and a
#: server that a fuzzed config drives to allocate without bound hits a limit
#: (and answers or crashes: a finding) instead of taking the machine.
TRAMPOLINE = """
import ctypes, os, resource, signal, sys
parent, limit, command = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
try:
    ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG, Linux only
except (AttributeError, OSError):
    pass
if os.getppid() != parent:
    sys.exit(0)
if limit:
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
os.execv(command[0], command)
"""


def tied(command: Sequence[str], data_limit: int = 0) -> list[str]:
    """``command`` run through TRAMPOLINE."""
    return [sys.executable, "-c", TRAMPOLINE, str(os.getpid()), str(data_limit), *command]


def ensure_models(repository: Path) -> None:
    """Build the example models into ``repository`` unless they are there."""
    if all((repository / m / "config.pbtxt").is_file() for m in EXAMPLE_MODELS):
        return
    from models.build import build_repository  # onnx: heavy, and the fuzzing child needs none

    print(f"building the example models into {repository}", flush=True)
    build_repository(repository)


def make_config_model(repository: Path, extra: Path) -> mc.ModelConfig:
    """Copy ``simple`` to ``extra/fuzzed``; return simple's config."""
    shutil.copytree(repository / "simple", extra / CONFIG_MODEL)
    config = mc.ModelConfig()
    text_format.Parse((repository / "simple" / "config.pbtxt").read_text(), config)
    renamed = mc.ModelConfig()
    renamed.CopyFrom(config)
    renamed.name = CONFIG_MODEL
    (extra / CONFIG_MODEL / "config.pbtxt").write_text(text_format.MessageToString(renamed))
    return config


def start_server(
    repositories: Sequence[Path], log_path: Path, memory_mb: int
) -> tuple[subprocess.Popen[bytes], str]:
    """``lockgate serve`` in explicit control mode on a free port; waits until it is ready."""
    port = free_port()
    command = [
        *(sys.executable, "-m", "lockgate", "serve"),
        *(arg for repo in repositories for arg in ("--model-repository", str(repo))),
        *("--host", "127.0.0.1", "--grpc-port", str(port), "--no-metrics"),
        *("--model-control-mode", "explicit", "--drain-seconds", "5"),
        *(arg for name in (*EXAMPLE_MODELS, CONFIG_MODEL) for arg in ("--load-model", name)),
        # A fuzzed config that fails leaves `fuzzed` unloaded: still serving.
        "--no-strict-readiness",
        # LOG_ALARMS reads text logs, whatever LOCKGATE_LOG_FORMAT says.
        *("--log-format", "text", "--log-level", "info"),
    ]
    # The checkout's own code, whether or not it is installed.
    paths = [str(ROOT / "server"), str(ROOT / "client"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            tied(command, memory_mb * 2**20), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    url = f"127.0.0.1:{port}"
    try:
        wait_ready(url, process, timeout=180)
    except (RuntimeError, TimeoutError) as exc:
        process.kill()
        raise SystemExit(f"{exc}; see {log_path}") from None
    return process, url


def stop_server(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def final_check(process: subprocess.Popen[bytes], url: str, log_path: Path) -> list[str]:
    """What is wrong with the server after fuzzing: empty if it still serves and logged no bug."""
    problems = []
    if process.poll() is not None:
        problems.append(f"the server exited with {process.returncode}")
    else:
        with grpc.insecure_channel(url) as channel:
            infer = channel.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            try:
                wrong = check_answer(infer(check_request(), timeout=TIMEOUT_S))
            except grpc.RpcError as error:
                wrong = f"{error.code().name}: {error.details()}"
            if wrong:
                problems.append(f"a valid request after fuzzing: {wrong}")
    alarms = log_alarms(log_path.read_text(errors="replace"))
    if alarms:
        problems.append("the server logged a bug:\n" + "\n".join(alarms))
    return problems


def write_seeds(seeds: Path, configs: list[str]) -> None:
    requests = seed_requests()
    for name, request in requests.items():
        (seeds / f"infer-{name}").write_bytes(
            bytes([SEED_BYTE[INFER]]) + request.SerializeToString()
        )
    streams = {
        "simple-string": ["simple", "simple_string"],
        "typed-outputs": ["simple_typed", "simple_outputs", "simple"],
        "mlp": ["mlp"],
    }
    for name, models in streams.items():
        frames = join_frames(requests[m].SerializeToString() for m in models)
        (seeds / f"stream-{name}").write_bytes(bytes([SEED_BYTE[STREAM]]) + frames)
    for index, config in enumerate(configs):
        (seeds / f"config-{index}").write_bytes(bytes([SEED_BYTE[CONFIG]]) + config.encode())


def libfuzzer_arguments(
    passed: list[str], corpus: Path, seeds: Path, dictionary: Path
) -> list[str]:
    """The child's libFuzzer arguments: the user's, plus defaults for what they left out."""
    flags = [a for a in passed if a.startswith("-")]
    inputs = [a for a in passed if not a.startswith("-")]
    given = {flag.lstrip("-").partition("=")[0] for flag in flags}
    defaults = {
        "dict": str(dictionary),
        "artifact_prefix": f"{ROOT / 'bench' / 'results' / 'fuzz-artifacts'}{os.sep}",
        # Our RPC deadlines catch hangs first; this catches the harness's own.
        "timeout": "120",
        "print_final_stats": "1",
    }
    flags += [f"-{name}={value}" for name, value in defaults.items() if name not in given]
    for flag in flags:
        name, _, prefix = flag.lstrip("-").partition("=")
        if name == "artifact_prefix":  # libFuzzer will not create its directory
            Path(prefix if prefix.endswith(os.sep) else os.path.dirname(prefix) or ".").mkdir(
                parents=True, exist_ok=True
            )
    if inputs and all(Path(i).is_file() for i in inputs):
        return [*flags, *inputs]  # replaying given inputs: no corpus
    return [*flags, str(corpus), *inputs, str(seeds)]


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Other arguments (-flag=value, input files, corpus directories) go to libFuzzer.",
    )
    parser.add_argument("--repository", type=Path, default=ROOT / "models" / "repository")
    parser.add_argument(
        "--corpus",
        type=Path,
        default=None,
        help="where libFuzzer keeps the inputs it finds (default: a temporary directory)",
    )
    parser.add_argument("--check-every", type=int, default=25, metavar="N")
    parser.add_argument(
        "--server-memory-mb",
        type=int,
        default=4096,
        help="the server's data-segment limit (RLIMIT_DATA); 0 for none",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser.parse_known_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the server, fuzz it in a child process, check it once more; 0 if nothing was found."""
    child = os.environ.get(CHILD_ENV)
    if child:
        run_child(json.loads(child), list(sys.argv[1:] if argv is None else argv))
        return 0  # not reached: libFuzzer exits
    args, passed = parse_args(argv)
    ensure_models(args.repository)
    work = Path(tempfile.mkdtemp(prefix="lockgate-fuzz-"))
    for sub in ("extra", "seeds", "corpus"):
        (work / sub).mkdir()
    corpus = args.corpus or work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    simple_config = make_config_model(args.repository, work / "extra")
    write_seeds(work / "seeds", seed_configs(simple_config))
    dictionary = work / "lockgate.dict"
    dictionary.write_text("".join(dictionary_line(t) + "\n" for t in dictionary_tokens()))

    log_path = work / "server.log"
    process, url = start_server([args.repository, work / "extra"], log_path, args.server_memory_mb)
    print(f"fuzzing server pid {process.pid} on {url}; its log: {log_path}", flush=True)
    settings = {
        "url": url,
        "pid": process.pid,
        "log": str(log_path),
        "check_every": args.check_every,
    }
    command = [sys.executable, str(Path(__file__).resolve())]
    command += libfuzzer_arguments(passed, corpus, work / "seeds", dictionary)
    problems: list[str] = []
    fuzzer: subprocess.Popen[bytes] | None = None
    try:
        fuzzer = subprocess.Popen(
            tied(command), env={**os.environ, CHILD_ENV: json.dumps(settings)}
        )
        code = fuzzer.wait()
        problems = final_check(process, url, log_path)
    except KeyboardInterrupt:
        code = 130
        if fuzzer is not None:
            fuzzer.wait()
    finally:
        running = process.poll() is None  # a server found dead is reported already
        exit_code = stop_server(process)
    if running and exit_code != 0 and code != 130:
        problems.append(f"the server exited with {exit_code} after SIGTERM")
    for problem in problems:
        print(f"FINDING after fuzzing: {problem}", flush=True)
    failed = code != 0 or bool(problems)
    if failed or args.keep:
        print(f"kept {work} (server log: {log_path})", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("fuzzing verdict:", "FAIL" if failed else "PASS", flush=True)
    return code or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main())
