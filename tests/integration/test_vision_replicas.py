"""Vision scaled out to three processes: the orchestrator's round_robin channel spreads calls over them,
a killed replica costs no client request (UNAVAILABLE is retried by the service config), and a restarted
replica comes back into rotation."""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
import pytest

from copilot.client import auth_metadata, diagnose_request
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.launcher import Mesh

pytestmark = pytest.mark.integration
REPLICAS = ["vision", "vision-2", "vision-3"]


def analyzed(mesh: Mesh, name: str) -> int:
    with urllib.request.urlopen(mesh.metrics_url(name), timeout=5) as reply:
        text = reply.read().decode()
    match = re.search(
        r'copilot_rpc_requests_total\{[^}]*rpc_grpc_status_code="OK"[^}]*VisionService/AnalyzeImage"\} (\S+)', text
    ) or re.search(
        r"copilot_rpc_requests_total\{[^}]*VisionService/AnalyzeImage[^}]*"
        r'rpc_grpc_status_code="OK"[^}]*\} (\S+)',
        text,
    )
    return int(float(match.group(1))) if match else 0


def test_killed_replica_costs_no_request_and_rejoins(tmp_path, crack_photo):
    mesh = Mesh.on_free_ports(vision_replicas=3, data_dir=tmp_path)
    mesh.start()
    try:
        mesh.wait_ready(timeout=300)
        with grpc.insecure_channel(mesh.address("orchestrator")) as channel:
            stub = copilot_pb2_grpc.CopilotServiceStub(channel)
            request = diagnose_request(
                "PUNE-IN",
                "PUMP-A-7",
                "Pump housing cracked near the flange",
                crack_photo,
                equipment_type="brushed-steel",
            )

            def diagnose_many(n: int) -> list:
                return [stub.Diagnose(request, metadata=auth_metadata("technician-1"), timeout=30) for _ in range(n)]

            warm = diagnose_many(12)
            assert all(r.stages[0].state == copilot_pb2.STAGE_STATE_OK for r in warm), [r.stages[0].error for r in warm]
            spread = {name: analyzed(mesh, name) for name in REPLICAS}
            assert all(count >= 2 for count in spread.values()), spread  # round_robin used every replica

            mesh.kill("vision-2")
            during = diagnose_many(15)
            assert all(r.stages[0].state == copilot_pb2.STAGE_STATE_OK for r in during), [
                r.stages[0].error for r in during
            ]  # zero failed (or degraded) requests
            after = {name: analyzed(mesh, name) for name in ("vision", "vision-3")}
            assert sum(after.values()) - spread["vision"] - spread["vision-3"] == 15  # survivors took the load

            mesh.services["vision-2"].spawn()
            mesh.wait_ready(timeout=300, names=["vision-2"])
            deadline = time.monotonic() + 15
            while analyzed(mesh, "vision-2") == 0 and time.monotonic() < deadline:
                diagnose_many(3)
            assert analyzed(mesh, "vision-2") > 0  # back in rotation

        # the replicas share one reference store: what an engineer registers on one, the others use
        from copilot.agents.v1 import vision_pb2, vision_pb2_grpc
        from copilot.v1 import common_pb2
        from tests.conftest import token

        engineer = auth_metadata(token("engineer"))
        with grpc.insecure_channel(mesh.address("vision-3")) as channel:
            registered = vision_pb2_grpc.VisionServiceStub(channel).RegisterReference(
                vision_pb2.RegisterReferenceRequest(
                    equipment_type="pump-housing", label="good", image=common_pb2.Image(data=crack_photo)
                ),
                metadata=engineer,
                timeout=60,
            )
        for replica in ("vision", "vision-2"):
            with grpc.insecure_channel(mesh.address(replica)) as channel:
                vision = vision_pb2_grpc.VisionServiceStub(channel)
                deadline, seen = time.monotonic() + 20, []
                while time.monotonic() < deadline:
                    listed = vision.ListReferences(
                        vision_pb2.ListReferencesRequest(equipment_type="pump-housing"), metadata=engineer, timeout=10
                    )
                    seen = [r.reference_id for r in listed.references]
                    if seen:
                        break
                    time.sleep(0.5)
                assert seen == [registered.reference.reference_id], replica
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:  # its model is rebuilt right after the index changes
                    findings = vision.AnalyzeImage(
                        vision_pb2.AnalyzeImageRequest(
                            image=common_pb2.Image(data=crack_photo), equipment_type="pump-housing"
                        ),
                        metadata=auth_metadata(token("service")),
                        timeout=30,
                    )
                    if findings.reference_set == "pump-housing":
                        break
                    time.sleep(0.5)
                assert findings.reference_set == "pump-housing", replica
    finally:
        mesh.stop()
