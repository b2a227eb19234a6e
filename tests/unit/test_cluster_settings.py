"""How a pod's settings arrive: credentials as files named after the setting (COPILOT_SECRETS_DIR), never
environment variables; metrics on the path OTEL_METRICS_EXPORTER names; thread pools sized by the container's CPU
limit rather than the node's cores."""

from __future__ import annotations

import pytest

from copilot.runtime.cpus import available_cpus, cgroup_cpu_limit
from copilot.runtime.telemetry import _otlp_enabled


def test_a_setting_comes_from_its_file_in_the_secrets_dir_and_the_environment_wins(tmp_path, monkeypatch):
    from services.orchestrator.server import OrchestratorSettings
    from services.rag.server import KnowledgeSettings

    (tmp_path / "orchestrator_database_url").write_text("postgresql+psycopg://copilot:pw@/copilot\n")
    (tmp_path / "knowledge_model_api_key").write_text("sk-from-a-file\n")
    (tmp_path / "jwt-secret").write_text("x" * 40)  # other files in the folder are not settings
    for name in ("ORCHESTRATOR_DATABASE_URL", "KNOWLEDGE_MODEL_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("COPILOT_SECRETS_DIR", str(tmp_path))
    assert OrchestratorSettings().database_url == "postgresql+psycopg://copilot:pw@/copilot"  # trailing newline gone
    knowledge = KnowledgeSettings()
    assert knowledge.model_api_key.get_secret_value() == "sk-from-a-file"
    assert "sk-from-a-file" not in repr(knowledge)  # a secret is never printed
    monkeypatch.setenv("ORCHESTRATOR_DATABASE_URL", "sqlite:///override.db")
    assert OrchestratorSettings().database_url == "sqlite:///override.db"


def test_without_a_secrets_dir_or_with_a_missing_one_settings_keep_their_defaults(tmp_path, monkeypatch):
    from services.orchestrator.server import OrchestratorSettings

    monkeypatch.delenv("ORCHESTRATOR_DATABASE_URL", raising=False)
    monkeypatch.delenv("COPILOT_SECRETS_DIR", raising=False)
    default = OrchestratorSettings().database_url
    monkeypatch.setenv("COPILOT_SECRETS_DIR", str(tmp_path / "not-mounted"))
    assert OrchestratorSettings().database_url == default


@pytest.mark.parametrize(
    ("exporter", "expected"),
    [(None, True), ("otlp", True), ("prometheus", False), ("prometheus,otlp", True), ("none", False)],
)
def test_metrics_go_by_otlp_only_when_the_exporter_setting_names_it(monkeypatch, exporter, expected):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel-collector:4317")
    if exporter is None:
        monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    else:
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", exporter)
    assert _otlp_enabled("METRICS") is expected
    assert _otlp_enabled("TRACES") is True  # traces keep their own setting


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("50000 100000\n", 1), ("max 100000\n", None)],
)
def test_the_cpu_limit_is_read_from_the_cgroup_and_rounded_up(tmp_path, cpu_max, expected):
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert cgroup_cpu_limit(path) == expected
    assert 1 <= available_cpus(path) <= (expected or 10_000)


def test_no_cgroup_file_means_the_cpus_the_process_may_run_on(tmp_path):
    import os

    assert cgroup_cpu_limit(tmp_path / "absent") is None
    assert available_cpus(tmp_path / "absent") == len(os.sched_getaffinity(0))
