"""What the deployment files are checked against: the environment names and ports the code really reads."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import AliasChoices

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OUR_IMAGES = (
    "manufacturing-copilot/orchestrator",
    "manufacturing-copilot/vision",
    "manufacturing-copilot/knowledge",
    "manufacturing-copilot/report",
)


def settings_classes() -> dict:
    from services.orchestrator.server import OrchestratorSettings
    from services.rag.server import KnowledgeSettings
    from services.report.server import ReportSettings
    from services.vision.server import VisionSettings

    return {
        "orchestrator": OrchestratorSettings,
        "vision": VisionSettings,
        "knowledge": KnowledgeSettings,
        "report": ReportSettings,
    }


def env_names(settings_cls) -> set[str]:
    prefix = settings_cls.model_config.get("env_prefix", "")
    names = set()
    for name, field in settings_cls.model_fields.items():
        alias = field.validation_alias
        if isinstance(alias, AliasChoices):
            names.update(str(choice) for choice in alias.choices)
        elif isinstance(alias, str):
            names.add(alias)
        else:
            names.add(f"{prefix}{name}".upper())
    return names


@pytest.fixture(scope="session")
def known_env() -> set[str]:
    """Every environment name some part of the code reads: our settings, the OpenTelemetry SDK's, the
    Hugging Face offline switches and Python's own."""
    import opentelemetry.environment_variables as otel_api_env
    import opentelemetry.sdk.environment_variables as otel_env

    from copilot.runtime.auth import AuthSettings
    from copilot.runtime.config import TlsSettings

    names = set().union(*(env_names(cls) for cls in [*settings_classes().values(), AuthSettings, TlsSettings]))
    names |= {getattr(module, n) for module in (otel_env, otel_api_env) for n in dir(module) if n.startswith("OTEL_")}
    names |= {
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_HOME",
        "HOME",
        "PATH",
        "PYTHONUNBUFFERED",
        "PYTHONDONTWRITEBYTECODE",
        # read by the settings (copilot.runtime.config.secrets_dir), by libpq (PostgreSQL's location) and by the
        # BLAS / OpenMP runtimes (thread pools sized by the container's CPU limit)
        "COPILOT_SECRETS_DIR",
        "PGHOST",
        "PGPORT",
        "PGSSLMODE",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
    }
    return names


@pytest.fixture(scope="session")
def default_ports() -> dict[str, tuple[int, int]]:
    return {name: (cls().port, cls().metrics_port) for name, cls in settings_classes().items()}
