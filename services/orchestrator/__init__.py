"""Orchestrator: authenticates and validates Diagnose calls and runs the LangGraph workflow over the
agents' gRPC contracts (CopilotService)."""
