"""Starts the mesh as separate OS processes (one per agent) and waits for each to report SERVING.
Used by `copilot up`, the integration/e2e tests and the benchmarks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS

# name -> (python module, environment prefix)
SERVICES: dict[str, tuple[str, str]] = {
    "vision": ("services.vision", "VISION"),
    "knowledge": ("services.rag", "KNOWLEDGE"),
    "report": ("services.report", "REPORT"),
    "orchestrator": ("services.orchestrator", "ORCHESTRATOR"),
}


def kind_of(name: str) -> str:
    """'vision-2' (a replica) -> 'vision'."""
    return name.split("-", 1)[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def health_status(address: str, timeout: float = 1.0, service: str = "", channel: grpc.Channel | None = None
                  ) -> int | None:
    """grpc.health.v1 status of a server, or None when it does not answer (plaintext unless `channel` is given)."""
    with channel or grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout)
        except grpc.RpcError:
            return None
        return reply.status


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def module(self) -> str:
        return SERVICES[kind_of(self.name)][0]

    def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", self.module], env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Mesh:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    data_dir: Path = Path(".copilot-data")
    extra_env: dict[str, str] = field(default_factory=dict)
    vision_replicas: int = 1
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    # "dev": the seed's technician-<id> tokens are accepted, plus JWTs signed with the mesh's dev secret
    # (data_dir/auth/dev-jwt-secret, which `copilot token` reads). "jwt": AUTH_* must come from the environment.
    auth_mode: str = "dev"

    def __post_init__(self) -> None:
        # extra vision replicas listen 100 ports above the first (unless ports were given for them)
        for i in range(2, self.vision_replicas + 1):
            self.ports.setdefault(f"vision-{i}", self.ports["vision"] + 100 * (i - 1))
            self.metrics_ports.setdefault(f"vision-{i}", self.metrics_ports["vision"] + 100 * (i - 1))

    @property
    def names(self) -> list[str]:
        replicas = [f"vision-{i}" for i in range(2, self.vision_replicas + 1)]
        return ["vision", *replicas, "knowledge", "report", "orchestrator"]

    @classmethod
    def on_free_ports(cls, vision_replicas: int = 1, **kwargs) -> "Mesh":
        names = [*SERVICES, *(f"vision-{i}" for i in range(2, vision_replicas + 1))]
        return cls(ports={name: free_port() for name in names}, metrics_ports={name: free_port() for name in names},
                   vision_replicas=vision_replicas, **kwargs)

    def vision_target(self) -> str:
        """What the orchestrator dials: one address, or every replica for round_robin."""
        replicas = [n for n in self.names if kind_of(n) == "vision"]
        if len(replicas) == 1:
            return self.address("vision")
        return "ipv4:" + ",".join(self.address(n) for n in replicas)

    def address(self, name: str) -> str:
        return f"{self.host}:{self.ports[name]}"

    def metrics_url(self, name: str) -> str:
        return f"http://{self.host}:{self.metrics_ports[name]}/metrics"

    def _env(self, name: str) -> dict[str, str]:
        kind = kind_of(name)
        prefix = SERVICES[kind][1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env,
               f"{prefix}_HOST": self.host, f"{prefix}_PORT": str(self.ports[name]),
               f"{prefix}_METRICS_HOST": self.host, f"{prefix}_METRICS_PORT": str(self.metrics_ports[name])}
        if self.auth_mode == "dev":
            env["AUTH_MODE"] = "dev"
            if not (env.get("AUTH_JWT_SECRET") or env.get("AUTH_JWT_PUBLIC_KEY_FILE")):
                env.setdefault("AUTH_JWT_SECRET_FILE", str(self.dev_secret_file))
        if name == "knowledge":
            env.setdefault("KNOWLEDGE_CHROMA_PATH", str(self.data_dir / "chroma"))
        if kind == "vision":  # the replicas share one reference store (flock'd index, synced every 2 s)
            env.setdefault("VISION_REFERENCE_DIR", str(self.data_dir / "vision-references"))
        if name == "orchestrator":
            env.update(VISION_ADDR=self.vision_target(), KNOWLEDGE_ADDR=self.address("knowledge"),
                       REPORT_ADDR=self.address("report"))
            env.setdefault("ORCHESTRATOR_DATABASE_URL", f"sqlite:///{self.data_dir / 'incidents.db'}")
        return env

    @property
    def dev_secret_file(self) -> Path:
        return self.data_dir / "auth" / "dev-jwt-secret"

    def token(self, role: str = "technician", subject: str = "") -> str:
        """A JWT this (dev-mode) mesh accepts."""
        from copilot.runtime.auth import Role, mint_token, signing_secret

        secret = self.extra_env.get("AUTH_JWT_SECRET") or signing_secret(self.dev_secret_file, create=True)
        return mint_token(subject or f"{role}-local", Role.parse(role), secret=secret)

    def start(self) -> None:
        if self.auth_mode == "dev":
            from copilot.runtime.auth import dev_secret

            dev_secret(self.dev_secret_file)
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            proc = ServiceProcess(name, self.ports[name], self._env(name), logs / f"{name}.log")
            proc.spawn()
            self.services[name] = proc

    def wait_ready(self, timeout: float = 180.0, names: list[str] | None = None) -> dict[str, float]:
        """Block until every (named) service reports SERVING; returns seconds to SERVING per service."""
        started = time.monotonic()
        pending = set(names or self.services)
        ready: dict[str, float] = {}
        while pending:
            for name in sorted(pending):
                proc = self.services[name]
                if not proc.alive:
                    raise RuntimeError(f"{name} exited with {proc.process.returncode}; log:\n{self.log_tail(name)}")
                if health_status(self.address(name), timeout=0.5) == health_pb2.HealthCheckResponse.SERVING:
                    ready[name] = time.monotonic() - started
                    pending.discard(name)
            if pending:
                if time.monotonic() - started > timeout:
                    tails = "\n".join(f"--- {n}\n{self.log_tail(n)}" for n in pending)
                    raise TimeoutError(f"not SERVING after {timeout:.0f}s: {sorted(pending)}\n{tails}")
                time.sleep(0.1)
        return ready

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.services[name].log_path
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.services[name]
        if proc.alive:
            proc.process.send_signal(sig)
            proc.process.wait(timeout=30)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.services[name].spawn()

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every process (graceful drain), SIGKILL what is still there after `timeout`."""
        for proc in self.services.values():
            if proc.alive:
                proc.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, proc in self.services.items():
            if proc.process is None:
                continue
            try:
                codes[name] = proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.process.kill()
                codes[name] = proc.process.wait()
        return codes

    def __enter__(self) -> "Mesh":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
