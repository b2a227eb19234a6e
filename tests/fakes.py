"""In-process stand-ins for the three agents, for unit tests of the orchestrator's own code (the workflow, the
public edge). The real agents run in the contract, integration and e2e tests."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import grpc

from copilot.domain import (
    AdviceRequest,
    Defect,
    Guidance,
    GuidanceStep,
    IncidentReport,
    ReportInputs,
    SopCitation,
    VisionFindings,
    VisionRequest,
)
from copilot.reporting import compose_report


class FakeAgents:
    """Records each call and the timeout it was given; an agent can be made to fail, hang or be slow. A hung
    or slow call that gets cancelled is recorded in `cancelled`."""

    def __init__(
        self, vision_conf=0.9, knowledge_conf=0.8, fail=(), hang=(), delay_s: float = 0.0, reviews=(), sop_types=()
    ):
        self.reviews = tuple(reviews)  # GuidanceReview the knowledge agent attaches
        self.sop_types = tuple(sop_types)  # equipment types of the cited SOP
        self.seen_equipment: dict[str, str] = {}  # agent -> the equipment type / reference set it was given
        self.vision_conf, self.knowledge_conf = vision_conf, knowledge_conf
        self.fail, self.hang = set(fail), set(hang)
        self.delay_s = delay_s
        self.calls: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.seen_defects = None
        self.seen_inputs = None
        self.in_flight = 0
        self.peak_in_flight = 0  # most agent calls running at once
        self.released = asyncio.Event()  # set by release(): hung calls go on

    def release(self) -> None:
        """Calls hanging now (and later) go on as if the agent answered."""
        self.hang.clear()
        self.released.set()

    async def _maybe(self, name, timeout):
        self.calls.append((name, timeout))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            await self._behave(name, timeout)
        finally:
            self.in_flight -= 1

    async def _behave(self, name, timeout):
        if name in self.fail:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), details=f"{name} is down"
            )
        try:
            if name in self.hang:
                await asyncio.wait_for(self.released.wait(), timeout)
            elif self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(name)
            raise

    async def analyze_image(self, request: VisionRequest, *, timeout: float) -> VisionFindings:
        await self._maybe("vision", timeout)
        self.seen_equipment["vision"] = request.reference_set
        return VisionFindings((Defect("crack", self.vision_conf),), self.vision_conf, 0.5, "1 defect", "fake")

    async def advise(self, request: AdviceRequest, *, timeout: float) -> Guidance:
        await self._maybe("knowledge", timeout)
        self.seen_defects = request.defects
        self.seen_equipment["knowledge"] = request.equipment_type
        return Guidance(
            (GuidanceStep("Check coolant.", ("SOP-123",), ("Cooling",)),),
            (SopCitation("SOP-123", "CNC", "Cooling", 0.7, equipment_types=self.sop_types),),
            ("Lock out.",),
            self.knowledge_conf,
            False,
            "q",
            equipment_type=request.equipment_type,
            reviews=self.reviews,
        )

    async def compose_report(self, inputs: ReportInputs, *, timeout: float) -> IncidentReport:
        await self._maybe("report", timeout)
        self.seen_inputs = inputs
        return compose_report(inputs, datetime.now(UTC))

    async def close(self) -> None:
        return None
