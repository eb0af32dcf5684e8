"""TLS, mTLS, certificate reload, and bearer-token authentication.

Certificates come from the ``openssl`` command (skipped where it is absent);
servers are real ``lockgate serve`` processes. Token checks use raw stubs and
tritonclient (``headers={"authorization": "Bearer ..."}``). Reloads are
observed by polling until the server shows the new state, bounded by
``PATIENCE_S``; nothing asserts on a duration.
"""

from __future__ import annotations

import hmac
import os
import queue
import shutil
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import SERVICE, ServerProcess, simple_inputs, stub
from tritonclient.utils import InferenceServerException

from lockgate import security
from lockgate.security import SecurityConfigError, TokenStore, parse_tokens
from lockgate_client._proto import grpc_service_pb2 as pb
from lockgate_client._proto import inference_service_pb2_grpc as svc
from models.build import build_simple

StartServer = Callable[..., ServerProcess]
Metadata = list[tuple[str, str]]

#: Bound on every wait for the server; reaching it is a failure, never a pass.
PATIENCE_S = 30.0
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
#: The only texts a denied caller may read.
DENIAL_TEXTS = {security.UNAUTHENTICATED[1], security.PERMISSION_DENIED[1]}

INFER_TOKEN = "infer-token-5b1c"
CONTROL_TOKEN = "control-token-9e2f"
BOTH_TOKEN = "both-token-77aa"


def bearer(token: str) -> Metadata:
    return [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("security-repo")
    build_simple(repo)
    return repo


# --- helpers -------------------------------------------------------------------------------


def simple_request() -> pb.ModelInferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    Tensor = pb.ModelInferRequest.InferInputTensor
    return pb.ModelInferRequest(
        model_name="simple",
        inputs=[
            Tensor(name="INPUT0", datatype="INT32", shape=[1, 16]),
            Tensor(name="INPUT1", datatype="INT32", shape=[1, 16]),
        ],
        raw_input_contents=[a.tobytes(), a.tobytes()],
    )


def infer(channel: grpc.Channel, metadata: Metadata | None = None) -> pb.ModelInferResponse:
    call = stub(channel, "ModelInfer", pb.ModelInferResponse)
    return call(simple_request(), metadata=metadata, timeout=PATIENCE_S)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    error: Any = info.value
    return error.code(), error.details() or ""


def wait_serving(srv: ServerProcess, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Health check over TLS (or not): the conftest's probe speaks plaintext only."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if srv.process.poll() is not None:
            pytest.fail(f"server exited:\n{srv.log()}")
        channel = (
            grpc.secure_channel(srv.url, credentials)
            if credentials is not None
            else grpc.insecure_channel(srv.url)
        )
        with channel:
            try:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=2
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
        time.sleep(0.2)
    pytest.fail(f"server not ready:\n{srv.log()}")


def tls_channel(
    srv: ServerProcess, ca: Path, client: tuple[Path, Path] | None = None, fresh: bool = True
) -> grpc.Channel:
    """A channel trusting only ``ca``; ``fresh``: its own connection, never a shared one."""
    key, chain = (client[0].read_bytes(), client[1].read_bytes()) if client else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
    options = [("grpc.use_local_subchannel_pool", 1)] if fresh else []
    return grpc.secure_channel(srv.url, credentials, options=options)


def presented_certificate(port: int) -> bytes:
    """The certificate the server shows a brand-new TLS connection (DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we compare the bytes instead
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der_of(pem: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem.read_text())


def replace_file(target: Path, content: bytes) -> None:
    """Replace ``target`` at once, as a deployment tool (or Kubernetes) does."""
    staging = target.with_name(target.name + ".new")
    staging.write_bytes(content)
    os.replace(staging, target)


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"never happened: {what}")


# --- TLS and mTLS --------------------------------------------------------------------------


def test_tls_with_a_test_ca(
    start_server: StartServer, repository: Path, certificates: Path
) -> None:
    srv = start_server(
        repository,
        *(
            "--tls-cert",
            str(certificates / "server.pem"),
            "--tls-key",
            str(certificates / "server.key"),
        ),
        wait=False,
    )
    wait_serving(srv, grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes()))
    with tls_channel(srv, certificates / "ca.pem") as channel:
        assert infer(channel).model_name == "simple"
    client = tc.InferenceServerClient(
        srv.url, ssl=True, root_certificates=str(certificates / "ca.pem")
    )
    with client:
        assert client.infer("simple", simple_inputs()).as_numpy("OUTPUT0") is not None
    # Plaintext, and TLS trusting another CA, both fail at the handshake.
    with grpc.insecure_channel(srv.url) as plain:
        assert code_of(lambda: infer(plain))[0] == grpc.StatusCode.UNAVAILABLE
    with tls_channel(srv, certificates / "ca2.pem") as untrusted:
        assert code_of(lambda: infer(untrusted))[0] == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("level, quiet", [("warning", True), ("debug", False)])
def test_grpc_core_logs_follow_the_log_level(
    start_server: StartServer, repository: Path, certificates: Path, level: str, quiet: bool
) -> None:
    """Plaintext attempts on a TLS port: gRPC core's handshake lines only at debug."""
    srv = start_server(
        repository,
        *("--tls-cert", str(certificates / "server.pem")),
        *("--tls-key", str(certificates / "server.key")),
        *("--log-level", level),
        wait=False,
    )
    wait_serving(srv, grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes()))
    for _ in range(5):
        with (
            grpc.insecure_channel(srv.url) as plaintext,
            pytest.raises(grpc.FutureTimeoutError),
        ):
            grpc.channel_ready_future(plaintext).result(timeout=0.5)
    with tls_channel(srv, certificates / "ca.pem") as channel:
        assert infer(channel).model_name == "simple"  # the handshakes were attempted
    srv.stop()
    assert ("Handshake failed" not in srv.log()) is quiet


def test_mtls_needs_a_client_certificate(
    start_server: StartServer, repository: Path, certificates: Path
) -> None:
    srv = start_server(
        repository,
        *(
            "--tls-cert",
            str(certificates / "server.pem"),
            "--tls-key",
            str(certificates / "server.key"),
        ),
        *("--tls-client-ca", str(certificates / "ca.pem")),
        wait=False,
    )
    client_pair = (certificates / "client.key", certificates / "client.pem")
    ca = (certificates / "ca.pem").read_bytes()
    wait_serving(
        srv,
        grpc.ssl_channel_credentials(ca, client_pair[0].read_bytes(), client_pair[1].read_bytes()),
    )
    with tls_channel(srv, certificates / "ca.pem", client_pair) as mutual:
        assert infer(mutual).model_name == "simple"
    with tls_channel(srv, certificates / "ca.pem") as anonymous:
        assert code_of(lambda: infer(anonymous))[0] == grpc.StatusCode.UNAVAILABLE
    # A certificate from a CA the server does not trust is no better than none.
    with tls_channel(
        srv, certificates / "ca.pem", (certificates / "rotated.key", certificates / "rotated.pem")
    ) as alien:
        assert code_of(lambda: infer(alien))[0] == grpc.StatusCode.UNAVAILABLE
    client = tc.InferenceServerClient(
        srv.url,
        ssl=True,
        root_certificates=str(certificates / "ca.pem"),
        private_key=str(client_pair[0]),
        certificate_chain=str(client_pair[1]),
    )
    with client:
        assert client.is_model_ready("simple")


def test_certificates_reload_without_restart(
    start_server: StartServer, repository: Path, certificates: Path, tmp_path: Path
) -> None:
    live = tmp_path / "tls"
    live.mkdir()
    shutil.copy(certificates / "server.pem", live / "cert.pem")
    shutil.copy(certificates / "server.key", live / "key.pem")
    srv = start_server(
        repository,
        *("--tls-cert", str(live / "cert.pem"), "--tls-key", str(live / "key.pem")),
        wait=False,
    )
    wait_serving(srv, grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes()))
    assert presented_certificate(srv.grpc_port) == der_of(certificates / "server.pem")
    before = tls_channel(srv, certificates / "ca.pem")
    assert infer(before).model_name == "simple"  # a connection made before the change

    # A half-written certificate is never used: the server keeps the current pair.
    (live / "cert.pem").write_bytes((certificates / "rotated.pem").read_bytes()[:100])
    assert presented_certificate(srv.grpc_port) == der_of(certificates / "server.pem")
    # So is a certificate whose key has not been written yet.
    replace_file(live / "cert.pem", (certificates / "rotated.pem").read_bytes())
    assert presented_certificate(srv.grpc_port) == der_of(certificates / "server.pem")
    with tls_channel(srv, certificates / "ca.pem") as still_old:
        assert infer(still_old).model_name == "simple"

    replace_file(live / "key.pem", (certificates / "rotated.key").read_bytes())
    eventually(
        lambda: presented_certificate(srv.grpc_port) == der_of(certificates / "rotated.pem"),
        "new connections get the rotated certificate",
    )
    with tls_channel(srv, certificates / "ca2.pem") as trusting_new:
        assert infer(trusting_new).model_name == "simple"
    with tls_channel(srv, certificates / "ca.pem") as trusting_old:
        assert code_of(lambda: infer(trusting_old))[0] == grpc.StatusCode.UNAVAILABLE
    # Connections made before keep working with the certificate they were made with.
    assert infer(before).model_name == "simple"
    before.close()
    assert srv.process.poll() is None
    assert "TLS certificate files changed: reloaded" in srv.log()


def test_bad_tls_settings_stop_the_start(
    start_server: StartServer, repository: Path, certificates: Path
) -> None:
    cases = [
        ("--tls-cert", str(certificates / "server.pem")),  # no key
        (
            "--tls-cert",
            str(certificates / "server.pem"),
            "--tls-key",
            str(certificates / "rotated.key"),
        ),
        ("--tls-client-ca", str(certificates / "ca.pem")),  # mTLS without TLS
    ]
    for flags in cases:
        srv = start_server(repository, *flags, wait=False)
        assert srv.process.wait(60) == 1, srv.log()
        assert "Traceback" not in srv.log()


# --- bearer tokens: unit -------------------------------------------------------------------


def test_token_file_format() -> None:
    tokens = parse_tokens(
        [
            "# comment",
            "",
            "a",
            "b infer",
            "c control",
            "d\tinfer, control",
            "  e   control,infer  ",
        ],
        "tokens",
    )
    assert tokens == {
        "a": {"infer"},
        "b": {"infer"},
        "c": {"control"},
        "d": {"infer", "control"},
        "e": {"infer", "control"},
    }
    with pytest.raises(SecurityConfigError) as info:
        parse_tokens(["s3cret admin"], "tokens")
    assert "line 1" in str(info.value)
    assert "s3cret" not in str(info.value)  # never echo a secret


def test_token_store_rereads_at_most_once_a_second(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("old infer\n")
    now = [100.0]
    store = TokenStore(str(path), clock=lambda: now[0])
    assert store.scopes(b"old") == frozenset({"infer"})
    path.write_text("new control\n")
    os.utime(path, ns=(1, 1))  # a different mtime, whatever the file system's resolution
    assert store.scopes(b"new") is None  # not looked at yet
    now[0] += security.TOKEN_RECHECK_S
    assert store.scopes(b"new") == frozenset({"control"})
    assert store.scopes(b"old") is None
    # A broken rewrite keeps the tokens that work.
    path.write_text("new bogus-scope\n")
    os.utime(path, ns=(2, 2))
    now[0] += security.TOKEN_RECHECK_S
    assert store.scopes(b"new") == frozenset({"control"})
    path.unlink()
    now[0] += security.TOKEN_RECHECK_S
    assert store.scopes(b"new") == frozenset({"control"})


def test_tokens_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every presented token is compared, with hmac.compare_digest, to every known one."""
    path = tmp_path / "tokens"
    path.write_text("first infer\nsecond infer\nthird control\n")
    store = TokenStore(str(path))
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert store.scopes(b"first") == frozenset({"infer"})
    assert store.scopes(b"nope") is None
    assert len(compared) == 6  # no early exit on a match
    # Digests of equal length: the comparison's time says nothing of the token's length.
    assert {len(a) for pair in compared for a in pair} == {32}


def test_environment_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(security.ENV_TOKENS, "one infer;two control; ;three")
    assert security.load_tokens(None) == {
        "one": {"infer"},
        "two": {"control"},
        "three": {"infer"},
    }


# --- bearer tokens: end to end -------------------------------------------------------------


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(
        f"# tokens of the test\n{INFER_TOKEN} infer\n{CONTROL_TOKEN} control\n"
        f"{BOTH_TOKEN} infer,control\n"
    )
    return path


@pytest.fixture
def auth_server(
    start_server: StartServer, repository: Path, token_file: Path
) -> Iterator[ServerProcess]:
    srv = start_server(
        repository,
        *("--auth-token-file", str(token_file), "--model-control-mode", "explicit"),
        *("--load-model", "simple"),
        env={security.ENV_TOKENS: "env-token-1 infer;env-token-2 control"},
    )
    yield srv


def test_calls_without_a_valid_token_are_refused(auth_server: ServerProcess) -> None:
    presented: list[Metadata | None] = [
        None,
        bearer("wrong"),
        bearer(INFER_TOKEN[:-1]),  # a prefix of a valid token
        bearer(INFER_TOKEN + "x"),
        [("authorization", f"Basic {INFER_TOKEN}")],
        [("authorization", INFER_TOKEN)],
        [("authorization", "Bearer ")],
        [("x-api-key", INFER_TOKEN)],
    ]
    requests: list[tuple[str, Any, Any]] = [
        ("ModelInfer", simple_request(), pb.ModelInferResponse),
        ("ModelMetadata", pb.ModelMetadataRequest(name="simple"), pb.ModelMetadataResponse),
        ("ModelConfig", pb.ModelConfigRequest(name="simple"), pb.ModelConfigResponse),
        ("ModelReady", pb.ModelReadyRequest(name="simple"), pb.ModelReadyResponse),
        ("ModelStatistics", pb.ModelStatisticsRequest(), pb.ModelStatisticsResponse),
        ("RepositoryIndex", pb.RepositoryIndexRequest(), pb.RepositoryIndexResponse),
        ("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse),
        (
            "RepositoryModelUnload",
            pb.RepositoryModelUnloadRequest(model_name="simple"),
            pb.RepositoryModelUnloadResponse,
        ),
    ]
    with grpc.insecure_channel(auth_server.url) as channel:
        for metadata in presented:
            for method, request, response in requests:
                call = stub(channel, method, response)
                code, details = code_of(
                    lambda c=call, r=request, m=metadata: c(r, metadata=m, timeout=30)  # type: ignore[misc]
                )
                assert code == UNAUTHENTICATED, (method, metadata)
                assert details == security.UNAUTHENTICATED[1]  # nothing more is said
        # Streams, unknown methods and reflection: the same, and nothing is parsed.
        stream = channel.stream_stream(SERVICE + "ModelStreamInfer", None, None)
        code, _ = code_of(lambda: list(stream(iter([b"\xff" * 8]), timeout=30)))
        assert code == UNAUTHENTICATED
        unknown = channel.unary_unary("/no.Such/Method", None, None)
        assert code_of(lambda: unknown(b"", timeout=30))[0] == UNAUTHENTICATED
        reflection = channel.stream_stream(
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", None, None
        )
        assert code_of(lambda: list(reflection(iter([b""]), timeout=30)))[0] == UNAUTHENTICATED
        # Still serving the callers who have a token.
        assert infer(channel, bearer(INFER_TOKEN)).model_name == "simple"
    assert INFER_TOKEN not in auth_server.log()


def test_health_needs_no_token(auth_server: ServerProcess) -> None:
    with grpc.insecure_channel(auth_server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        live = stub(channel, "ServerLive", pb.ServerLiveResponse)
        assert live(pb.ServerLiveRequest(), timeout=30).live
        ready = stub(channel, "ServerReady", pb.ServerReadyResponse)
        assert ready(pb.ServerReadyRequest(), timeout=30).ready
    with tc.InferenceServerClient(auth_server.url) as client:
        assert client.is_server_live()
        assert client.is_server_ready()


def test_token_scopes(auth_server: ServerProcess) -> None:
    def client_error(call: Callable[[], object]) -> str:
        with pytest.raises(InferenceServerException) as info:
            call()
        assert info.value.message() in DENIAL_TEXTS
        return str(info.value.status())

    with tc.InferenceServerClient(auth_server.url) as client:
        for token in (INFER_TOKEN, "env-token-1"):
            headers = {"authorization": f"Bearer {token}"}
            result = client.infer("simple", simple_inputs(), headers=headers)
            assert result.as_numpy("OUTPUT0") is not None
            assert client.get_model_metadata("simple", headers=headers).name == "simple"
            assert client.is_model_ready("simple", headers=headers)
            denied = client_error(lambda h=headers: client.unload_model("simple", headers=h))  # type: ignore[misc]
            assert denied == "StatusCode.PERMISSION_DENIED"
            denied = client_error(lambda h=headers: client.load_model("simple", headers=h))  # type: ignore[misc]
            assert denied == "StatusCode.PERMISSION_DENIED"
        assert client.is_model_ready("simple", headers={"authorization": f"Bearer {BOTH_TOKEN}"})
        # control may load and unload (and, as the operator's token, also infer).
        for token in (CONTROL_TOKEN, "env-token-2", BOTH_TOKEN):
            headers = {"authorization": f"Bearer {token}"}
            client.unload_model("simple", headers=headers)
            assert not client.is_model_ready("simple", headers=headers)
            client.load_model("simple", headers=headers)
            assert client.is_model_ready("simple", headers=headers)
            assert client.infer("simple", simple_inputs(), headers=headers) is not None
        anonymous = client_error(lambda: client.infer("simple", simple_inputs()))
        assert anonymous == "StatusCode.UNAUTHENTICATED"


def test_tokens_rotate_without_restart(auth_server: ServerProcess, token_file: Path) -> None:
    with grpc.insecure_channel(auth_server.url) as channel:

        def accepted(token: str) -> bool:
            try:
                infer(channel, bearer(token))
            except grpc.RpcError as error:
                assert error.code() == UNAUTHENTICATED
                return False
            return True

        assert accepted(INFER_TOKEN)
        assert not accepted("rotated-token")
        # Rotation, step 1: old and new both valid.
        replace_file(token_file, f"{INFER_TOKEN} infer\nrotated-token infer\n".encode())
        eventually(lambda: accepted("rotated-token"), "the new token is accepted")
        assert accepted(INFER_TOKEN)
        # Step 2: the old one removed.
        token_file.write_text("rotated-token infer\n")
        eventually(lambda: not accepted(INFER_TOKEN), "the removed token is refused")
        assert accepted("rotated-token")
        # A broken file keeps the tokens that work; an empty one refuses everyone.
        token_file.write_text("rotated-token no-such-scope\n")
        assert accepted("rotated-token")
        token_file.write_text("")
        eventually(lambda: not accepted("rotated-token"), "an empty file refuses everyone")
        assert accepted("env-token-1")  # the environment's tokens stay
    assert auth_server.process.poll() is None
    assert "rotated-token" not in auth_server.log()


def test_a_revoked_token_stops_working_on_an_open_stream(
    auth_server: ServerProcess, token_file: Path
) -> None:
    """Checked per message: a stream opened before the revocation is cut at its next request."""
    requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()

    def feed() -> Iterator[pb.ModelInferRequest]:
        while (item := requests.get()) is not None:
            yield item

    request = simple_request()
    with grpc.insecure_channel(auth_server.url) as channel:
        stream = svc.GRPCInferenceServiceStub(channel).ModelStreamInfer(  # type: ignore[no-untyped-call]
            feed(), metadata=bearer(INFER_TOKEN), timeout=120
        )
        answers = iter(stream)
        try:
            requests.put(request)
            assert not next(answers).error_message
            token_file.write_text(f"{CONTROL_TOKEN} control\n")
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(200):  # the token file is re-read within a second
                    requests.put(request)
                    assert not next(answers).error_message
                    time.sleep(0.05)
            assert info.value.code() == UNAUTHENTICATED  # type: ignore[attr-defined]
        finally:
            requests.put(None)
            stream.cancel()
    assert auth_server.process.poll() is None


def test_control_stays_off_without_explicit_mode(
    start_server: StartServer, repository: Path, token_file: Path
) -> None:
    srv = start_server(repository, "--auth-token-file", str(token_file))
    with grpc.insecure_channel(srv.url) as channel:
        unload = stub(channel, "RepositoryModelUnload", pb.RepositoryModelUnloadResponse)
        code, _ = code_of(
            lambda: unload(
                pb.RepositoryModelUnloadRequest(model_name="simple"),
                metadata=bearer(CONTROL_TOKEN),
                timeout=30,
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert infer(channel, bearer(CONTROL_TOKEN)).model_name == "simple"


def test_an_empty_token_file_refuses_everyone(
    start_server: StartServer, repository: Path, tmp_path: Path
) -> None:
    """Authentication configured but no token: closed, never open."""
    empty = tmp_path / "no-tokens"
    empty.write_text("# nobody yet\n")
    srv = start_server(repository, "--auth-token-file", str(empty))
    with grpc.insecure_channel(srv.url) as channel:
        assert code_of(lambda: infer(channel))[0] == UNAUTHENTICATED
        assert code_of(lambda: infer(channel, bearer("anything")))[0] == UNAUTHENTICATED


def test_bad_token_files_stop_the_start(
    start_server: StartServer, repository: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "bad-tokens"
    bad.write_text("s3cret-value superuser\n")
    for path in (bad, tmp_path / "missing"):
        srv = start_server(repository, "--auth-token-file", str(path), wait=False)
        assert srv.process.wait(60) == 1
        log = srv.log()
        assert "Traceback" not in log
        assert "s3cret-value" not in log


def test_tokens_with_tls(
    start_server: StartServer, repository: Path, certificates: Path, token_file: Path
) -> None:
    """Tokens travel inside TLS; both checks apply."""
    srv = start_server(
        repository,
        *(
            "--tls-cert",
            str(certificates / "server.pem"),
            "--tls-key",
            str(certificates / "server.key"),
        ),
        *("--auth-token-file", str(token_file)),
        wait=False,
    )
    wait_serving(srv, grpc.ssl_channel_credentials((certificates / "ca.pem").read_bytes()))
    with tls_channel(srv, certificates / "ca.pem") as channel:
        assert code_of(lambda: infer(channel))[0] == UNAUTHENTICATED
        assert infer(channel, bearer(INFER_TOKEN)).model_name == "simple"
