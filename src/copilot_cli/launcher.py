"""Starts the mesh as separate OS processes (one per agent) and waits for each to report SERVING; the
`Supervisor` keeps it running the way a kubelet does (restart with back-off, liveness, give up on a crash loop).
Used by `copilot up`, the integration/e2e tests and the benchmarks."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from copilot.runtime.config import DEFAULT_METRICS_PORTS, DEFAULT_PORTS, incident_history_url
from copilot.runtime.config import data_dir as default_data_dir
from services import PACKAGES

log = logging.getLogger(__name__)

# name -> (python module, environment prefix of its settings)
SERVICES: dict[str, tuple[str, str]] = {name: (package, name.upper()) for name, package in PACKAGES.items()}


def kind_of(name: str) -> str:
    """'vision-2' (a replica) -> 'vision'."""
    return name.split("-", 1)[0]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free ports: every socket is held until all are bound (one at a time, the kernel may hand
    out a port just released again, and two services of one mesh then race for it)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def health_status(
    address: str, timeout: float = 1.0, service: str = "", channel: grpc.Channel | None = None
) -> int | None:
    """grpc.health.v1 status of a server, or None when it does not answer (plaintext unless `channel` is given)."""
    with channel or grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(  # type: ignore[attr-defined]  # set in __init__
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
        return reply.status


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def handle(self) -> subprocess.Popen[bytes]:
        """The running (or exited) process; a service that was never spawned has none."""
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process

    @property
    def module(self) -> str:
        return SERVICES[kind_of(self.name)][0]

    def spawn(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


@dataclass
class Mesh:
    host: str = "127.0.0.1"
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    metrics_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_METRICS_PORTS))
    data_dir: Path = field(default_factory=default_data_dir)
    extra_env: dict[str, str] = field(default_factory=dict)
    vision_replicas: int = 1
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    # "dev": the dev `technician-<id>` tokens are accepted, plus JWTs signed with the mesh's dev secret
    # (data_dir/auth/dev-jwt-secret, which `copilot token` reads). "jwt": AUTH_* must come from the environment.
    auth_mode: str = "dev"
    supervisor: Supervisor | None = None

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
    def on_free_ports(cls, vision_replicas: int = 1, **kwargs) -> Mesh:
        names = [*SERVICES, *(f"vision-{i}" for i in range(2, vision_replicas + 1))]
        ports = free_ports(2 * len(names))
        return cls(
            ports=dict(zip(names, ports[: len(names)], strict=True)),
            metrics_ports=dict(zip(names, ports[len(names) :], strict=True)),
            vision_replicas=vision_replicas,
            **kwargs,
        )

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
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            **self.extra_env,
            f"{prefix}_HOST": self.host,
            f"{prefix}_PORT": str(self.ports[name]),
            f"{prefix}_METRICS_HOST": self.host,
            f"{prefix}_METRICS_PORT": str(self.metrics_ports[name]),
        }
        if self.auth_mode == "dev":
            env["AUTH_MODE"] = "dev"
            if not (env.get("AUTH_JWT_SECRET") or env.get("AUTH_JWT_PUBLIC_KEY_FILE")):
                env.setdefault("AUTH_JWT_SECRET_FILE", str(self.dev_secret_file))
        if name == "knowledge":
            env.setdefault("KNOWLEDGE_CHROMA_PATH", str(self.data_dir / "chroma"))
        if kind == "vision":  # the replicas share one reference store (flock'd index, synced every 2 s)
            env.setdefault("VISION_REFERENCE_DIR", str(self.data_dir / "vision-references"))
        if name == "orchestrator":
            env.update(
                VISION_ADDR=self.vision_target(),
                KNOWLEDGE_ADDR=self.address("knowledge"),
                REPORT_ADDR=self.address("report"),
            )
            env.setdefault("ORCHESTRATOR_DATABASE_URL", incident_history_url(self.data_dir))
        return env

    @property
    def dev_secret_file(self) -> Path:
        return self.data_dir / "auth" / "dev-jwt-secret"

    def token(self, role: str = "technician", subject: str = "") -> str:
        """A JWT this (dev-mode) mesh accepts."""
        from copilot.runtime.auth import Role, mint_token, signing_secret

        secret = self.extra_env.get("AUTH_JWT_SECRET") or signing_secret(self.dev_secret_file, create=True)
        return mint_token(subject or f"{role}-local", Role.named(role), secret=secret)

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
                    raise RuntimeError(f"{name} exited with {proc.handle.returncode}; log:\n{self.log_tail(name)}")
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
            proc.handle.send_signal(sig)
            proc.handle.wait(timeout=30)

    def restart(self, name: str) -> None:
        self.kill(name)
        self.services[name].spawn()

    def stop(self, timeout: float = 20.0) -> dict[str, int | None]:
        """SIGTERM every process (graceful drain), SIGKILL what is still there after `timeout`."""
        if self.supervisor is not None:
            self.supervisor.stop()
        for proc in self.services.values():
            if proc.alive:
                proc.handle.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for name, proc in self.services.items():
            if proc.process is None:
                continue
            try:
                codes[name] = proc.handle.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.handle.kill()
                codes[name] = proc.handle.wait()
        return codes

    def supervise(
        self, policy: RestartPolicy | None = None, on_event: Callable[[SupervisorEvent], None] | None = None
    ) -> Supervisor:
        """Restart what crashes or hangs from now on (`copilot up` does; tests that kill by hand do not)."""
        self.supervisor = Supervisor(self, policy or RestartPolicy(), on_event)
        self.supervisor.start()
        return self.supervisor

    def __enter__(self) -> Mesh:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def exit_reason(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


@dataclass(frozen=True)
class RestartPolicy:
    """A kubelet's behaviour for one box: CrashLoopBackOff (1 s doubling to 30 s, reset once a process has
    been SERVING for `stable_after_s`), a liveness check (`liveness_failures` failed health checks
    `liveness_period_s` apart restart a process that is alive but does not answer), a startup limit, and a
    crash loop left down after `give_up_after` crashes in a row that were never stable in between."""

    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0
    give_up_after: int = 6
    liveness_period_s: float = 5.0
    liveness_timeout_s: float = 2.0
    liveness_failures: int = 6
    startup_timeout_s: float = 600.0  # a start that never reaches SERVING counts as hung (a startup probe)
    poll_s: float = 0.2

    def backoff(self, crashes_in_a_row: int) -> float:
        return min(self.initial_backoff_s * 2 ** max(crashes_in_a_row - 1, 0), self.max_backoff_s)


class State(StrEnum):
    STARTING = "starting"  # spawned, not SERVING yet
    SERVING = "serving"
    BACKOFF = "backoff"  # exited; restarts when its back-off ends
    FAILED = "failed"  # kept crashing: left down while the rest serves
    STOPPED = "stopped"  # the mesh is stopping


@dataclass
class ServiceStatus:
    name: str
    address: str
    state: State = State.STARTING
    pid: int | None = None
    restarts: int = 0
    crashes_in_a_row: int = 0
    last_exit: str = ""
    restart_at: float = 0.0  # monotonic
    serving_since: float | None = None  # monotonic
    started_at: float = field(default_factory=time.monotonic)
    missed_checks: int = 0
    next_check: float = 0.0


@dataclass(frozen=True)
class SupervisorEvent:
    service: str
    kind: str  # crashed | restarted | serving | hung | gave-up
    restarts: int
    reason: str = ""
    delay_s: float = 0.0
    log_tail: str = ""


class Supervisor:
    """Watches every process of a Mesh on a thread: a process that exits is restarted after its back-off, one
    that stops answering health checks is killed and restarted, one that keeps crashing is left down and
    reported. The state of every service is written to `<data_dir>/mesh-state.json` for `copilot status`."""

    def __init__(
        self, mesh: Mesh, policy: RestartPolicy, on_event: Callable[[SupervisorEvent], None] | None = None
    ) -> None:
        self.mesh, self.policy, self.on_event = mesh, policy, on_event
        self.status = {
            name: ServiceStatus(name, mesh.address(name), pid=proc.handle.pid if proc.process else None)
            for name, proc in mesh.services.items()
        }
        self.events: deque[SupervisorEvent] = deque(maxlen=500)  # the latest, for callers and tests
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-supervisor", daemon=True)
        self._lock = threading.Lock()

    @property
    def state_file(self) -> Path:
        return self.mesh.data_dir / "mesh-state.json"

    def start(self) -> None:
        self._write_state()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        with self._lock:
            for status in self.status.values():
                status.state = State.STOPPED
        self._write_state()

    def wait_settled(self, timeout: float = 300.0) -> dict[str, State]:
        """Until every service is SERVING or given up on; returns the states."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                states = {name: s.state for name, s in self.status.items()}
            if all(state in (State.SERVING, State.FAILED) for state in states.values()):
                return states
            time.sleep(0.1)
        raise TimeoutError(f"not settled after {timeout:.0f}s: {states}")

    def _emit(
        self, status: ServiceStatus, kind: str, reason: str = "", delay_s: float = 0.0, log_tail: str = ""
    ) -> None:
        event = SupervisorEvent(status.name, kind, status.restarts, reason, delay_s, log_tail)
        self.events.append(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # a display callback that fails must not stop supervision
                log.exception("supervisor event callback failed")

    def _run(self) -> None:
        while not self._stop.wait(self.policy.poll_s):
            changed = False
            for name, status in self.status.items():
                with self._lock:
                    changed |= self._step(self.mesh.services[name], status, time.monotonic())
            if changed:
                self._write_state()

    def _step(self, proc: ServiceProcess, status: ServiceStatus, now: float) -> bool:
        """One look at one process; True when its status changed."""
        policy = self.policy
        if status.state in (State.FAILED, State.STOPPED):
            return False
        if status.state is State.BACKOFF:
            if now < status.restart_at:
                return False
            proc.spawn()
            status.restarts += 1
            status.state, status.pid, status.started_at = State.STARTING, proc.handle.pid, now
            status.serving_since, status.missed_checks, status.next_check = None, 0, now
            self._emit(status, "restarted", f"pid {status.pid}")
            return True
        if not proc.alive:
            code = proc.handle.returncode if proc.process is not None else None
            return self._crashed(proc, status, now, exit_reason(code))
        if now < status.next_check:
            return False
        status.next_check = now + (policy.liveness_period_s if status.state is State.SERVING else 0.5)
        serving = (
            health_status(status.address, timeout=policy.liveness_timeout_s) == health_pb2.HealthCheckResponse.SERVING
        )
        if serving:
            status.missed_checks = 0
            if status.state is State.STARTING:
                status.state, status.serving_since = State.SERVING, now
                self._emit(status, "serving", f"after {now - status.started_at:.1f}s")
                return True
            if status.crashes_in_a_row and now - (status.serving_since or now) >= policy.stable_after_s:
                status.crashes_in_a_row = 0  # stable again: the next crash starts the back-off over
            return False
        if status.state is State.SERVING:  # alive, but not answering: a liveness failure
            status.missed_checks += 1
            if status.missed_checks >= policy.liveness_failures:
                return self._hung(proc, status, now, f"{status.missed_checks} health checks failed")
        elif now - status.started_at > policy.startup_timeout_s:
            return self._hung(proc, status, now, f"not SERVING {policy.startup_timeout_s:.0f}s after its start")
        return False

    def _hung(self, proc: ServiceProcess, status: ServiceStatus, now: float, reason: str) -> bool:
        self._emit(status, "hung", reason)
        proc.handle.kill()
        proc.handle.wait(timeout=30)
        return self._crashed(proc, status, now, f"killed: {reason}")

    def _crashed(self, proc: ServiceProcess, status: ServiceStatus, now: float, reason: str) -> bool:
        status.crashes_in_a_row += 1
        status.last_exit, status.pid, status.serving_since = reason, None, None
        tail = self.mesh.log_tail(proc.name, lines=15)
        if status.crashes_in_a_row > self.policy.give_up_after:
            status.state = State.FAILED
            self._emit(status, "gave-up", f"{reason}; crashed {status.crashes_in_a_row} times in a row", log_tail=tail)
            return True
        delay = self.policy.backoff(status.crashes_in_a_row)
        status.state, status.restart_at = State.BACKOFF, now + delay
        self._emit(status, "crashed", reason, delay, log_tail=tail)
        return True

    def snapshot(self) -> dict[str, dict]:
        with self._lock:
            return {
                name: {
                    "state": s.state.value,
                    "pid": s.pid,
                    "restarts": s.restarts,
                    "address": s.address,
                    "last_exit": s.last_exit,
                    "crashes_in_a_row": s.crashes_in_a_row,
                }
                for name, s in self.status.items()
            }

    def _write_state(self) -> None:
        state = {"supervisor_pid": os.getpid(), "updated": time.time(), "services": self.snapshot()}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state, indent=2))
        temporary.replace(self.state_file)


def read_state(data_dir: Path) -> dict | None:
    """What the supervisor of a local mesh last wrote, or None when no mesh runs from data_dir."""
    path = data_dir / "mesh-state.json"
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        os.kill(state["supervisor_pid"], 0)
    except (ProcessLookupError, KeyError):
        return None
    return state
