"""The four services of the mesh, one package each, each a thin gRPC adapter (`server.py`, `servicer.py`) over
a core that never touches gRPC.

The knowledge agent lives in `services/rag` (the project's required layout); everywhere else (protos, the
`KNOWLEDGE_*` settings, metrics, traces, the CLI, the manifests) it is called "knowledge". `PACKAGES` is the
one place where the two names meet."""

#: service name -> the package that runs it (`python -m <package>`)
PACKAGES = {
    "vision": "services.vision",
    "knowledge": "services.rag",
    "report": "services.report",
    "orchestrator": "services.orchestrator",
}
