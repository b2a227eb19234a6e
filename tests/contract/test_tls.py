"""TLS and mTLS on every hop, with certificates made in the test (trustme): the caller → orchestrator edge and
the orchestrator → agent channels, configured only through TlsSettings (the TLS_* environment)."""

from __future__ import annotations

from contextlib import AsyncExitStack

import grpc
import pytest
import trustme

from copilot.agents.v1 import report_pb2, report_pb2_grpc
from copilot.client import aio_channel, diagnose_request
from copilot.runtime.config import TlsSettings
from copilot.v1 import copilot_pb2_grpc
from tests.conftest import token
from tests.contract.conftest import serving


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, as PEM files."""
    folder = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("orchestrator.copilot.internal")
    stranger = trustme.CA().issue_cert("intruder")
    files = {}
    for name, blob in [
        ("ca", ca.cert_pem),
        ("server.crt", server.cert_chain_pems[0]),
        ("server.key", server.private_key_pem),
        ("client.crt", client.cert_chain_pems[0]),
        ("client.key", client.private_key_pem),
        ("stranger.crt", stranger.cert_chain_pems[0]),
        ("stranger.key", stranger.private_key_pem),
    ]:
        path = folder / name
        blob.write_to_path(str(path))
        files[name] = path
    return files


def credentials(pki, cert: str | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{cert}.key"].read_bytes() if cert else None,
        certificate_chain=pki[f"{cert}.crt"].read_bytes() if cert else None,
    )


def report_request() -> report_pb2.ComposeReportRequest:
    return report_pb2.ComposeReportRequest(
        request_id="tls-1",
        plant_id="PUNE-IN",
        equipment_id="CNC-A-102",
        problem_description="Machine overheating",
        confidence_score=0.8,
    )


async def test_tls_server_answers_tls_clients_only(pki):
    from services.report.server import ReportSettings, build

    tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"])
    async with serving(*build(ReportSettings(port=0, host="127.0.0.1", tls=tls))) as server:
        address = f"127.0.0.1:{server.port}"
        async with aio_channel(address, token("service"), credentials=credentials(pki)) as channel:
            reply = await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(report_request(), timeout=10)
            assert "SUMMARY" in reply.report.rendered_text
        async with aio_channel(address, token("service")) as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await report_pb2_grpc.ReportServiceStub(plaintext).ComposeReport(report_request(), timeout=3)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_mtls_server_refuses_clients_without_a_certificate_from_its_ca(pki):
    from services.report.server import ReportSettings, build

    tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"], client_ca_file=pki["ca"])
    async with serving(*build(ReportSettings(port=0, host="127.0.0.1", tls=tls))) as server:
        address = f"127.0.0.1:{server.port}"
        for cert in (None, "stranger"):
            async with aio_channel(address, token("service"), credentials=credentials(pki, cert)) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(report_request(), timeout=3)
                assert caught.value.code() is grpc.StatusCode.UNAVAILABLE, cert
        async with aio_channel(address, token("service"), credentials=credentials(pki, "client")) as channel:
            reply = await report_pb2_grpc.ReportServiceStub(channel).ComposeReport(report_request(), timeout=10)
            assert reply.report.summary


async def test_every_hop_runs_over_mtls_from_settings(pki, tmp_path):
    """Caller → orchestrator (TLS) → report agent (mTLS, the orchestrator presents its certificate). The other
    agents are not running: their stages degrade, the report stage proves the mTLS hop."""
    from copilot_cli.launcher import free_port
    from services.orchestrator.server import OrchestratorSettings
    from services.orchestrator.server import build as build_orchestrator
    from services.report.server import ReportSettings
    from services.report.server import build as build_report

    agent_tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"], client_ca_file=pki["ca"])
    # the orchestrator serves with the server certificate and dials agents presenting the client certificate
    edge_tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"], ca_file=pki["ca"])
    async with AsyncExitStack() as stack:
        report = await stack.enter_async_context(
            serving(*build_report(ReportSettings(port=0, host="127.0.0.1", tls=agent_tls)))
        )
        settings = OrchestratorSettings(
            port=0,
            host="127.0.0.1",
            tls=edge_tls,
            database_url=f"sqlite:///{tmp_path / 'incidents.db'}",
            vision_addr=f"localhost:{free_port()}",
            knowledge_addr=f"localhost:{free_port()}",
            report_addr=f"localhost:{report.port}",
            knowledge_timeout_s=2,
        )
        edge = await stack.enter_async_context(serving(*build_orchestrator(settings)))
        async with aio_channel(f"localhost:{edge.port}", token(), credentials=credentials(pki)) as channel:
            reply = await copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
                diagnose_request("PUNE-IN", "CNC-A-102", "Machine overheating during operation"), timeout=20
            )
    states = {s.stage: s.state for s in reply.stages}
    from copilot.v1 import copilot_pb2

    assert states[copilot_pb2.STAGE_KNOWLEDGE] == copilot_pb2.STAGE_STATE_DEGRADED
    assert states[copilot_pb2.STAGE_REPORT] == copilot_pb2.STAGE_STATE_OK, reply.stages
    assert "report agent was unavailable" not in reply.report.summary


async def test_orchestrator_without_a_client_certificate_cannot_reach_an_mtls_agent(pki, tmp_path):
    from copilot.v1 import copilot_pb2
    from copilot_cli.launcher import free_port
    from services.orchestrator.server import OrchestratorSettings
    from services.orchestrator.server import build as build_orchestrator
    from services.report.server import ReportSettings
    from services.report.server import build as build_report

    agent_tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"], client_ca_file=pki["ca"])
    async with AsyncExitStack() as stack:
        report = await stack.enter_async_context(
            serving(*build_report(ReportSettings(port=0, host="127.0.0.1", tls=agent_tls)))
        )
        settings = OrchestratorSettings(
            port=0,
            host="127.0.0.1",
            tls=TlsSettings(ca_file=pki["ca"]),
            database_url=f"sqlite:///{tmp_path / 'incidents.db'}",
            vision_addr=f"localhost:{free_port()}",
            knowledge_addr=f"localhost:{free_port()}",
            report_addr=f"localhost:{report.port}",
            knowledge_timeout_s=1,
            report_timeout_s=3,
        )
        edge = await stack.enter_async_context(serving(*build_orchestrator(settings)))
        async with aio_channel(f"127.0.0.1:{edge.port}", token()) as channel:
            reply = await copilot_pb2_grpc.CopilotServiceStub(channel).Diagnose(
                diagnose_request("PUNE-IN", "CNC-A-102", "Machine overheating during operation"), timeout=20
            )
    states = {s.stage: s.state for s in reply.stages}
    assert states[copilot_pb2.STAGE_REPORT] == copilot_pb2.STAGE_STATE_DEGRADED


async def test_the_cli_reaches_a_tls_orchestrator_with_its_ca(pki, tmp_path):
    import asyncio
    import json
    import os
    import sys
    from pathlib import Path

    from services.orchestrator.server import OrchestratorSettings, build
    from tests.fakes import FakeAgents

    async def copilot(*args: str, **env: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            str(Path(sys.executable).with_name("copilot")),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "250", **env},
        )
        output, _ = await proc.communicate()
        return proc.returncode, output.decode()

    settings = OrchestratorSettings(
        port=0,
        host="127.0.0.1",
        database_url=f"sqlite:///{tmp_path / 'incidents.db'}",
        tls=TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"]),
    )
    async with serving(*build(settings, clients=FakeAgents())) as edge:
        addr = f"localhost:{edge.port}"
        code, output = await copilot(
            "diagnose",
            "--plant",
            "PUNE-IN",
            "--equipment",
            "CNC-A-102",
            "--problem",
            "Machine overheating during operation",
            "--json",
            "--addr",
            addr,
            COPILOT_TLS_CA_FILE=str(pki["ca"]),
        )
        assert code == 0, output
        assert json.loads(output[output.index("{") :])["report"]["summary"]
        code, output = await copilot("incidents", "--addr", addr, "--json")  # plaintext against TLS
        assert code == 2 and "UNAVAILABLE" in output


async def test_a_tls_server_serves_plaintext_health_on_its_probe_port_and_nothing_else(pki):
    """The kubelet's native gRPC probes cannot speak TLS: `probe_port` serves grpc.health.v1 in plaintext, with the
    statuses of the service's own port, and no other service (no work, no reflection); the service port still
    refuses plaintext."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from services.report.server import ReportSettings, build

    tls = TlsSettings(cert_file=pki["server.crt"], key_file=pki["server.key"], client_ca_file=pki["ca"])
    settings = ReportSettings(port=0, host="127.0.0.1", tls=tls, probe_port=0)
    async with serving(*build(settings)) as server:
        assert server.probe_port and server.probe_port != server.port
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.probe_port}") as probe:
            health = health_pb2_grpc.HealthStub(probe)
            for name in ("", "liveness", "copilot.agents.v1.ReportService"):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await report_pb2_grpc.ReportServiceStub(probe).ComposeReport(report_request(), timeout=5)
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in reflection_pb2_grpc.ServerReflectionStub(probe).ServerReflectionInfo(
                    iter([request]), timeout=5
                ):
                    pass
            assert caught.value.code() is grpc.StatusCode.UNIMPLEMENTED
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_pb2_grpc.HealthStub(plaintext).Check(health_pb2.HealthCheckRequest(), timeout=3)
            assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
