"""Full names of the gRPC services, read from the generated descriptors (one place, no heavy imports)."""

from __future__ import annotations

from copilot.agents.v1 import knowledge_pb2, report_pb2, vision_pb2
from copilot.v1 import copilot_pb2

VISION_SERVICE = vision_pb2.DESCRIPTOR.services_by_name["VisionService"].full_name
KNOWLEDGE_SERVICE = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name
REPORT_SERVICE = report_pb2.DESCRIPTOR.services_by_name["ReportService"].full_name
COPILOT_SERVICE = copilot_pb2.DESCRIPTOR.services_by_name["CopilotService"].full_name

#: The agents' services before their API moved to its own package (copilot.agents.v1): each agent still answers
#: these names, as its current ones, for one release (an orchestrator of the previous release during a rollout).
FORMER_AGENT_SERVICES = {
    "copilot.v1.VisionService": VISION_SERVICE,
    "copilot.v1.KnowledgeService": KNOWLEDGE_SERVICE,
    "copilot.v1.ReportService": REPORT_SERVICE,
}
