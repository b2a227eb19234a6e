"""The agents as seen by the workflow: an interface in domain types, and its gRPC implementation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from copilot.agents.v1 import knowledge_pb2, knowledge_pb2_grpc, report_pb2_grpc, vision_pb2, vision_pb2_grpc
from copilot.contracts import KNOWLEDGE_SERVICE, REPORT_SERVICE, VISION_SERVICE
from copilot.domain import AdviceRequest, Guidance, IncidentReport, ReportInputs, VisionFindings, VisionRequest
from copilot.runtime import convert
from copilot.runtime.channels import agent_channel
from copilot.runtime.config import TlsSettings


class AgentClients(Protocol):
    """The three agents, asked in domain types; `timeout` is the stage's budget in seconds."""

    async def analyze_image(self, request: VisionRequest, *, timeout: float) -> VisionFindings: ...

    async def advise(self, request: AdviceRequest, *, timeout: float) -> Guidance: ...

    async def compose_report(self, inputs: ReportInputs, *, timeout: float) -> IncidentReport: ...

    async def close(self) -> None: ...


class AgentCatalog(Protocol):
    """What the agents hold, for ListEquipment: the machine types the knowledge library's documents are written
    for, and the vision reference sets."""

    async def sop_types(self, plant_id: str, timeout: float) -> dict[str, list[str]]: ...

    async def reference_sets(self, timeout: float) -> list[str]: ...


class GrpcAgentClients:
    """Typed async stubs over one channel per agent (round_robin + retry policy in the service config)."""

    def __init__(
        self,
        vision_addr: str,
        knowledge_addr: str,
        report_addr: str,
        *,
        identity: Callable[[], str],
        max_message_bytes: int,
        tls: TlsSettings | None = None,
    ) -> None:
        """`identity()` gives the `Bearer …` header of this orchestrator's service token (auth.ServiceIdentity)."""
        self._channels = [
            agent_channel(address, [service], identity=identity, max_message_bytes=max_message_bytes, tls=tls)
            for address, service in (
                (vision_addr, VISION_SERVICE),
                (knowledge_addr, KNOWLEDGE_SERVICE),
                (report_addr, REPORT_SERVICE),
            )
        ]
        self.vision = vision_pb2_grpc.VisionServiceStub(self._channels[0])
        self.knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(self._channels[1])
        self.report = report_pb2_grpc.ReportServiceStub(self._channels[2])

    async def analyze_image(self, request: VisionRequest, *, timeout: float) -> VisionFindings:
        response = await self.vision.AnalyzeImage(convert.vision_request_to_pb(request), timeout=timeout)
        return convert.findings_from_pb(response)

    async def advise(self, request: AdviceRequest, *, timeout: float) -> Guidance:
        response = await self.knowledge.Advise(convert.advice_request_to_pb(request), timeout=timeout)
        return convert.guidance_from_pb(response)

    async def compose_report(self, inputs: ReportInputs, *, timeout: float) -> IncidentReport:
        response = await self.report.ComposeReport(convert.report_inputs_to_pb(inputs), timeout=timeout)
        return convert.report_from_pb(response.report)

    async def sop_types(self, plant_id: str, timeout: float) -> dict[str, list[str]]:
        """Machine type -> ids of the documents in scope at `plant_id` written for it (every page)."""
        found: dict[str, list[str]] = {}
        token = ""
        while True:
            page = await self.knowledge.ListDocuments(
                knowledge_pb2.ListDocumentsRequest(page_size=500, page_token=token, plant_id=plant_id), timeout=timeout
            )
            for document in page.documents:
                for equipment_type in document.equipment_types:
                    found.setdefault(equipment_type, []).append(document.document_id)
            token = page.next_page_token
            if not token:
                return dict(sorted(found.items()))

    async def reference_sets(self, timeout: float) -> list[str]:
        sets: set[str] = set()
        token = ""
        while True:
            page = await self.vision.ListReferences(
                vision_pb2.ListReferencesRequest(page_size=500, page_token=token), timeout=timeout
            )
            sets.update(r.equipment_type for r in page.references)
            token = page.next_page_token
            if not token:
                return sorted(sets)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
