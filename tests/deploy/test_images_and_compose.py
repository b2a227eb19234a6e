"""Container images and the compose file, checked statically (no Docker engine on the build machines):
the Dockerfile's targets, users, ports and paths; the compose file's references and environment names;
and that each image's Python extra really is enough to import and wire its service."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from copilot_cli.launcher import SERVICES

from .conftest import DEPLOY, ROOT

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


def stages() -> dict[str, list[str]]:
    """Dockerfile stage name -> its instruction lines (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found: dict[str, list[str]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if match:
            current = match.group(1)
            found[current] = [line]
        elif current:
            found[current].append(line)
    return found


def instruction(lines: list[str], keyword: str) -> list[str]:
    return [line.split(None, 1)[1] for line in lines if line.upper().startswith(keyword + " ")]


def env_of(lines: list[str]) -> dict[str, str]:
    pairs = {}
    for value in instruction(lines, "ENV"):
        pairs.update(dict(re.findall(r"(\w+)=(\S+)", value)))
    return pairs


def test_one_target_per_service_with_its_ports_entrypoint_and_extra(default_ports, known_env):
    all_stages = stages()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, (module, prefix) in SERVICES.items():
        lines = all_stages[name]
        grpc_port, metrics_port = default_ports[name]
        assert instruction(lines, "EXPOSE") == [f"{grpc_port} {metrics_port}"], name
        assert instruction(lines, "ENTRYPOINT") == [f'["python", "-m", "{module}"]'], name
        env = env_of(lines)
        assert env[f"{prefix}_HOST"] == "0.0.0.0" and env[f"{prefix}_PORT"] == str(grpc_port), name
        assert set(env) <= known_env, set(env) - known_env
        assert f"FROM runtime AS {name}" in lines[0]
        assert f"COPY --from=venv-{name} /opt/venv /opt/venv" in lines
        venv = all_stages[f"venv-{name}"]
        # only its own extra (torch's CPU build shared by the two image extras that need it)
        assert f"COPY --from=requirements /build/{name}.txt /build/" in venv and name in extras, name
        install = next(line for line in venv if f"-r /build/{name}.txt" in line)
        needs_torch = any(req.startswith("torch") for req in extras[name])
        assert venv[0] == f"FROM venv-{'torch' if needs_torch else 'base'} AS venv-{name}", name
        assert ("pip-install --torch" in install) is needs_torch, name
        assert venv[-1] == "RUN pip-install --no-deps /dist/*.whl", name  # the project itself comes last


def test_the_base_image_is_a_build_argument():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}$", text, re.M)  # pinned by digest
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert {f for f in froms if not f.startswith(("venv-", "runtime"))} == {"${BASE}"}


def test_dockerfile_declares_a_non_root_user_and_sigterm(known_env):
    """The declarations only; tests/containers proves them on running containers."""
    runtime = stages()["runtime"]
    assert instruction(runtime, "USER") == ["10001:10001"]
    assert instruction(runtime, "STOPSIGNAL") == ["SIGTERM"]
    env = env_of(runtime)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HOME"].startswith("/tmp")  # read-only root: writes go to /tmp
    assert set(env) <= known_env


def test_every_copied_path_exists():
    for lines in stages().values():
        for source in instruction(lines, "COPY"):
            parts = source.split()
            if parts[0].startswith("--from"):
                continue
            for path in parts[:-1]:
                assert (ROOT / path).exists(), path


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_compose_builds_each_service_from_its_target(compose):
    targets = set(stages())
    for name in SERVICES:
        build = compose["services"][name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
        assert build["target"] == name and name in targets
        svc = compose["services"][name]
        assert svc["read_only"] is True and svc["user"] == "10001:10001" and svc["cap_drop"] == ["ALL"]
        assert svc["healthcheck"]["test"][:2] == ["CMD", "copilot"]


def test_compose_wiring_matches_the_code(compose, known_env, default_ports):
    services = compose["services"]
    for name, svc in services.items():
        if name in SERVICES:
            assert set(svc.get("environment", {})) <= known_env, (name, set(svc["environment"]) - known_env)
    env = services["orchestrator"]["environment"]
    for agent in ("vision", "knowledge", "report"):
        assert env[f"{agent.upper()}_ADDR"] == f"dns:///{agent}:{default_ports[agent][0]}"
    assert services["knowledge"]["environment"]["KNOWLEDGE_CHROMA_HOST"] in services
    collector = env["OTEL_EXPORTER_OTLP_ENDPOINT"].split("//")[1].split(":")[0]
    assert collector in services
    assert "16686:16686" in services["jaeger"]["ports"]
    assert f"{default_ports['orchestrator'][0]}:{default_ports['orchestrator'][0]}" in services["orchestrator"]["ports"]
    assert services["vision"]["deploy"]["replicas"] >= 2  # vision scales on its own
    config = services["otel-collector"]["volumes"][0].split(":")[0]
    collector_config = yaml.safe_load((DEPLOY / config).read_text())
    jaeger = collector_config["exporters"]["otlp/jaeger"]["endpoint"].split(":")[0]
    assert jaeger == "jaeger" or jaeger in services["jaeger"]["networks"]["default"]["aliases"]
    assert "metrics" not in collector_config["service"]["pipelines"]  # metrics on one path: each /metrics
    assert all(services[name]["environment"]["OTEL_METRICS_EXPORTER"] == "prometheus" for name in SERVICES)


def dependency_cycle(services: dict) -> list[str] | None:
    """A cycle in `depends_on` (compose refuses to start one), as the list of services around it."""
    graph = {
        name: list(svc.get("depends_on", {}) if isinstance(svc.get("depends_on"), dict) else svc.get("depends_on", []))
        for name, svc in services.items()
    }
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for dependency in graph.get(name, []):
            if state.get(dependency) == "open":
                return [*path[path.index(dependency) :], dependency]
            if dependency not in state and (found := visit(dependency)):
                return found
        path.pop()
        state[name] = "done"
        return None

    for name in graph:
        if name not in state and (found := visit(name)):
            return found
    return None


def test_compose_starts_in_some_order(compose):
    assert dependency_cycle(compose["services"]) is None
    assert all(d in compose["services"] for svc in compose["services"].values() for d in svc.get("depends_on", []))
    # the check itself finds the cycle the file once had (knowledge -> chroma -> knowledge)
    looped = {**compose["services"], "chroma": {**compose["services"]["chroma"], "depends_on": ["knowledge"]}}
    assert dependency_cycle(looped) == ["knowledge", "chroma", "knowledge"]


BLOCKED = {
    "vision": ["chromadb", "sentence_transformers", "langchain_huggingface", "langgraph"],
    "knowledge": ["langgraph"],
    "report": ["numpy", "scipy", "PIL", "chromadb", "torch", "sentence_transformers", "langgraph"],
    "orchestrator": ["numpy", "scipy", "chromadb", "torch", "sentence_transformers", "langchain_huggingface"],
}


@pytest.mark.parametrize("service", list(SERVICES))
def test_each_image_extra_is_enough_to_import_and_wire_its_service(service):
    """Importing a service and building it must not touch another service's extra (its image lacks it)."""
    module = SERVICES[service][0]
    program = f"""
import importlib.abc, sys
blocked = {BLOCKED[service]!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"{{name}} is not in the {service} image")
sys.meta_path.insert(0, Block())
import asyncio, importlib
server = importlib.import_module("{module}.server")
async def main():
    spec, settings = server.build()
    assert spec.name == "{service if service != "knowledge" else "knowledge"}"
asyncio.run(main())
"""
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
