"""Manufacturing Copilot: a mesh of gRPC agent services under a LangGraph orchestrator."""

__version__ = "0.1.0"
