"""The dev overlay run as Podman pods: what the container test starts, stops and measures.

`podman kube play` runs each Deployment as a pod from our images, with the manifest's env, ConfigMap,
security context (uid, read-only root filesystem, dropped capabilities), emptyDir volumes, memory limits and
restartPolicy. Where Podman 4.3 (Debian bookworm's) cannot honour the overlay, `for_podman` adapts it, and
docs/deploy.md lists each difference:

* headless Services: none in Podman. Each pod joins one network with its Service name as a DNS alias, so
  `dns:///vision:50052` resolves to every vision pod, as the headless Service does in a cluster;
* Deployment replicas: Podman plays one pod per Deployment, so a second vision replica is the same
  Deployment played again under the name `vision-2` (same alias);
* StatefulSet (chroma): not played by Podman; the same pod template as a Deployment, its claim an emptyDir;
* Secret volumes (projected): `kube play` of 4.3 crashes on them; they become a hostPath folder holding the same
  files (the dev Secret's values, the JWT key the test's own);
* env from `resourceFieldRef` (thread counts from the CPU limit): resolved here to the limit's value;
* preStop hooks: not run by Podman 4.3 (the rolling-restart test plays the new pod before it stops the old one);
* ConfigMap volumes (the equipment registry): likewise a hostPath folder holding the ConfigMap's files;
* the OTel collector and Jaeger images cannot be pulled here: the test's own OTLP receiver (a container
  from our report image) takes the `otel-collector` alias;
* the orchestrator's gRPC port is published on 127.0.0.1 (hostPort) where a cluster has its Ingress;
* gRPC probes are ignored by Podman 4.3: the test polls each container's own health command instead.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
PODMAN = shutil.which("podman")
SERVICE_PORTS = {"orchestrator": 50051, "vision": 50052, "knowledge": 50053, "report": 50054}
METRICS_PORTS = {"orchestrator": 9464, "vision": 9465, "knowledge": 9466, "report": 9467}
# the order pods are played in: what others dial first (start times overlap; none waits for another)
PLAY_ORDER = ("chroma", "report", "vision", "vision-2", "knowledge", "orchestrator")


def podman(*args: str, check: bool = True, timeout: float = 120, capture: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([PODMAN or "podman", *args], check=check, timeout=timeout, text=True, capture_output=capture)


def kubectl() -> str:
    venv = Path(sys.executable).with_name("kubectl")
    return str(venv) if venv.exists() else (shutil.which("kubectl") or "kubectl")


def render(overlay: str = "dev") -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def service_of(name: str) -> str:
    """Pod name -> the Service (DNS alias) it stands behind: vision-2 is a vision replica, orchestrator-2 one of
    the orchestrator."""
    base, _, number = name.rpartition("-")
    return base if number.isdigit() and base in SERVICE_PORTS else name


def for_podman(
    docs: list[dict],
    *,
    tag: str,
    secret_dir: Path,
    orchestrator_port: int,
    extra_config: dict[str, str],
    knowledge_port: int = 0,
) -> dict[str, list[dict]]:
    """The rendered overlay as one `kube play` document list per pod (see the module's doc for each change)."""
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("copilot-config-"))
    config = copy.deepcopy(config)
    config["data"].update(extra_config)
    workloads = {d["metadata"]["name"]: copy.deepcopy(d) for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    plays: dict[str, list[dict]] = {}
    for name in ("chroma", "report", "vision", "knowledge", "orchestrator"):
        workload = workloads[name]
        if workload["kind"] == "StatefulSet":
            claims = workload["spec"].pop("volumeClaimTemplates", [])
            workload["spec"].pop("serviceName", None)
            workload["kind"], workload["apiVersion"] = "Deployment", "apps/v1"
            workload["spec"]["template"]["spec"].setdefault("volumes", []).extend(
                {"name": claim["metadata"]["name"], "emptyDir": {}} for claim in claims
            )
        for container in workload["spec"]["template"]["spec"]["containers"]:
            image, _, _ = container["image"].partition(":")
            container["image"] = f"{image}:{tag}"
            container.pop("lifecycle", None)
            for env in container.get("env", []):
                field_ref = env.get("valueFrom", {}).get("resourceFieldRef")
                if field_ref:  # limits.cpu, rounded up as the kubelet does with the default divisor 1
                    quantity = str(container["resources"]["limits"]["cpu"])
                    cpus = int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)
                    env.pop("valueFrom")
                    env["value"] = str(max(1, math.ceil(cpus)))
            # kube play publishes every containerPort on the host; pods reach each other on the network
            container.pop("ports", None)
        # published on 127.0.0.1: the orchestrator's port (where a cluster has its Ingress) and, for `make pods`,
        # the knowledge service's (so `copilot ingest` / `docs` manage the pods' library as a local mesh's)
        host_port = {"orchestrator": orchestrator_port, "knowledge": knowledge_port}.get(name, 0)
        if host_port:
            workload["spec"]["template"]["spec"]["containers"][0]["ports"] = [
                {"name": "grpc", "containerPort": SERVICE_PORTS[name], "hostPort": host_port, "hostIP": "127.0.0.1"}
            ]
        workload["spec"]["replicas"] = 1
        plays[name] = [config, workload]
    second = copy.deepcopy(plays["vision"][1])
    second["metadata"]["name"] = "vision-2"
    plays["vision-2"] = [config, second]
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    for pod, (_, workload) in plays.items():
        own_volumes(pod, workload["spec"]["template"]["spec"], secret_dir, config_maps)
    return plays


def write_secret_files(docs: list[dict], folder: Path, *, jwt_secret: str) -> None:
    """The files the pods' projected Secret volumes would hold, from the overlay's generated Secret (the JWT key
    replaced by the test's own), readable by the containers' uid."""
    import base64

    folder.mkdir(parents=True, exist_ok=True)
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].startswith("copilot-secrets"))
    values = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    values["jwt-secret"] = jwt_secret
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for volume in workload["spec"]["template"]["spec"].get("volumes", []):
            for source in volume.get("projected", {}).get("sources", []):
                for item in source.get("secret", {}).get("items", []):
                    if item["key"] in values:  # an optional key the Secret does not hold is no file
                        (folder / item["path"]).write_text(values[item["key"]])
                        (folder / item["path"]).chmod(0o644)
    folder.chmod(0o755)


def own_volumes(pod: str, spec: dict, secret_dir: Path, config_maps: dict[str, dict[str, str]] | None = None) -> None:
    """kube play makes an emptyDir a named volume called after the manifest's volume name, which every pod
    with a `tmp` or `data` volume would share: name each after its pod. The Secret volume becomes a hostPath, and
    so does a ConfigMap volume (its files written beside the secret's folder, readable by the container's uid)."""
    renamed = {}
    for volume in spec.get("volumes", []):
        if "secret" in volume or "projected" in volume:
            volume.pop("secret", None)
            volume.pop("projected", None)
            volume["hostPath"] = {"path": str(secret_dir), "type": "Directory"}
        elif "configMap" in volume:
            name = volume.pop("configMap")["name"]
            folder = secret_dir.parent / f"configmap-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            for file_name, content in (config_maps or {})[name].items():
                (folder / file_name).write_text(content)
                (folder / file_name).chmod(0o644)
            folder.chmod(0o755)
            volume["hostPath"] = {"path": str(folder), "type": "Directory"}
        else:
            renamed[volume["name"]] = volume["name"] = f"{pod}-{volume['name']}"
    for container in spec["containers"]:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed.get(mount["name"], mount["name"])


@dataclass
class PodmanMesh:
    """The dev overlay's pods on one Podman network, plus the test's OTLP receiver."""

    workdir: Path
    tag: str = "dev"
    orchestrator_port: int = 0
    knowledge_port: int = 0  # 0: not published
    secret: str = ""
    network: str = field(default_factory=lambda: f"copilot-ct-{uuid.uuid4().hex[:8]}")
    started_at: dict[str, float] = field(default_factory=dict)
    ready_after: dict[str, float] = field(default_factory=dict)
    plays: dict[str, list[dict]] = field(default_factory=dict)
    added: list[str] = field(default_factory=list)  # replicas played by add_replica, as an HPA scale-up adds pods

    @property
    def spans_file(self) -> Path:
        return self.workdir / "spans" / "spans.jsonl"

    @property
    def receiver(self) -> str:
        return f"{self.network}-otel"

    def container(self, pod: str) -> str:
        return f"{pod}-pod-0-{service_of(pod) if pod != 'chroma' else 'chroma'}"

    def start(self) -> None:
        docs = render("dev")
        secret_dir = self.workdir / "secret"
        write_secret_files(docs, secret_dir, jwt_secret=self.secret)
        self.spans_file.parent.mkdir(parents=True, exist_ok=True)
        self.spans_file.parent.chmod(0o777)
        podman("network", "create", self.network)
        podman(
            "run",
            "-d",
            "--name",
            self.receiver,
            "--network",
            f"{self.network}:alias=otel-collector",
            "--read-only",
            "-v",
            f"{ROOT / 'tests' / 'otlp_receiver.py'}:/receiver/otlp_receiver.py:ro",
            "-v",
            f"{self.spans_file.parent}:/spans",
            "--entrypoint",
            "python",
            f"manufacturing-copilot/report:{self.tag}",
            "/receiver/otlp_receiver.py",
            "4317",
            "/spans/spans.jsonl",
        )
        plays = for_podman(
            docs,
            tag=self.tag,
            secret_dir=secret_dir,
            orchestrator_port=self.orchestrator_port,
            knowledge_port=self.knowledge_port,
            extra_config={"OTEL_BSP_SCHEDULE_DELAY": "200", "ORCHESTRATOR_RATE_LIMIT": ""},
        )
        self.plays = plays
        for pod in PLAY_ORDER:
            self._play(pod, plays[pod])

    def _play(self, pod: str, documents: list[dict]) -> None:
        path = self.workdir / f"{pod}.yaml"
        path.write_text(yaml.safe_dump_all(documents))
        self.started_at[pod] = time.monotonic()
        podman("kube", "play", "--network", f"{self.network}:alias={service_of(pod)}", str(path))

    def add_replica(self, service: str, name: str, *, host_port: int = 0) -> None:
        """One more pod of a Deployment under the same Service alias (an HPA scale-up), with volumes of its own;
        `host_port` publishes its gRPC port on 127.0.0.1 (an orchestrator's, where a cluster has its Ingress)."""
        config, workload = copy.deepcopy(self.plays[service])
        workload["metadata"]["name"] = name
        spec = workload["spec"]["template"]["spec"]
        renamed = {}
        for volume in spec.get("volumes", []):
            if "hostPath" not in volume:
                renamed[volume["name"]] = volume["name"] = name + volume["name"][len(service) :]
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                mount["name"] = renamed.get(mount["name"], mount["name"])
            if host_port:
                container["ports"] = [
                    {
                        "name": "grpc",
                        "containerPort": SERVICE_PORTS[service],
                        "hostPort": host_port,
                        "hostIP": "127.0.0.1",
                    }
                ]
        self.added.append(name)
        self._play(name, [config, workload])

    def remove(self, pod: str) -> None:
        """`kube down` of one pod and its volumes (a scale-in's end, once the pod has stopped)."""
        path = self.workdir / f"{pod}.yaml"
        podman("kube", "down", str(path), check=False, timeout=120)
        podman("volume", "rm", "-f", *(v["name"] for v in volumes_of(path)), check=False)

    def health(self, pod: str, timeout: float = 5.0) -> bool:
        service = service_of(pod)
        if service == "chroma":
            probe = [
                "python",
                "-c",
                "import urllib.request; urllib.request.urlopen('http://localhost:8000/api/v2/heartbeat', timeout=2)",
            ]
        else:
            probe = ["copilot", "health", "--addr", f"localhost:{SERVICE_PORTS[service]}"]
        result = podman("exec", self.container(pod), *probe, check=False, timeout=timeout + 10)
        return result.returncode == 0

    def wait_ready(self, pods=PLAY_ORDER, timeout: float = 600) -> dict[str, float]:
        """Poll each container's own health command until it reports SERVING; seconds from play to SERVING."""
        pending = list(pods)
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for pod in list(pending):
                if self.health(pod):
                    self.ready_after[pod] = time.monotonic() - self.started_at[pod]
                    pending.remove(pod)
            if pending:
                time.sleep(0.5)
        if pending:
            raise TimeoutError(
                f"not SERVING after {timeout:.0f} s: {pending}\n"
                + "\n".join(f"--- {p}\n{self.logs(p)}" for p in pending)
            )
        return {pod: self.ready_after[pod] for pod in pods}

    def logs(self, pod: str, lines: int = 30) -> str:
        result = podman("logs", "--tail", str(lines), self.container(pod), check=False)
        return result.stdout + result.stderr

    def inspect(self, pod: str) -> dict:
        return json.loads(podman("inspect", self.container(pod)).stdout)[0]

    def signal(self, pod: str, sig: int) -> None:
        """Signal the container's main process from the host, as a crash or the kubelet would. (`podman kill`
        counts as stopped by the user, which restartPolicy Always then leaves stopped.)"""
        os.kill(self.inspect(pod)["State"]["Pid"], sig)

    def exec(self, pod: str, *command: str, check: bool = False) -> subprocess.CompletedProcess:
        return podman("exec", self.container(pod), *command, check=check)

    def metrics(self, pod: str) -> str:
        """The pod's Prometheus page, read inside the container (its metrics port is not published)."""
        port = METRICS_PORTS[service_of(pod)]
        return self.exec(
            pod,
            "python",
            "-c",
            "import urllib.request; print(urllib.request.urlopen("
            f"'http://localhost:{port}/metrics', timeout=5).read().decode())",
            check=True,
        ).stdout

    def memory_mib(self) -> dict[str, float]:
        """Each pod's container memory (cgroup usage, as `podman stats` and a kubelet's metrics see it)."""
        names = {self.container(pod): pod for pod in PLAY_ORDER}
        stats = json.loads(podman("stats", "--no-stream", "--format", "json", *names).stdout or "[]")
        found = {}
        for row in stats:
            usage = row.get("mem_usage") or row.get("MemUsage") or ""
            found[names.get(row.get("name") or row.get("Name"), "?")] = parse_bytes(usage.split("/")[0]) / 2**20
        return found

    def stop(self) -> None:
        for pod in reversed((*PLAY_ORDER, *self.added)):
            path = self.workdir / f"{pod}.yaml"
            if path.exists():
                podman("kube", "down", str(path), check=False, timeout=120)
                podman("volume", "rm", "-f", *(v["name"] for v in volumes_of(path)), check=False)
        podman("rm", "-f", "-t", "0", self.receiver, check=False)
        podman("network", "rm", "-f", self.network, check=False)


def parse_bytes(text: str) -> float:
    text = text.strip()
    units = {"kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30, "b": 1}
    for unit in sorted(units, key=len, reverse=True):
        if text.lower().endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text or 0)


def volumes_of(path: Path) -> list[dict]:
    workload = next(d for d in yaml.safe_load_all(path.read_text()) if d["kind"] == "Deployment")
    return [v for v in workload["spec"]["template"]["spec"].get("volumes", []) if "hostPath" not in v]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:`port` already (a local mesh of `make run`, another `make pods`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def main(argv: list[str]) -> int:
    """`python -m tests.containers.podman up|down` (`make pods` / `make pods-down`): the same pods as the
    container test, left running: the orchestrator on 127.0.0.1:50051 and the knowledge service on 127.0.0.1:50053
    (so `copilot diagnose`, `ingest`, `docs` and `token` work against them as against a local mesh), JWTs signed with
    the local dev secret, spans in .copilot-data/pods/spans/. Refuses to start where those ports are taken, and
    removes what it started when a pod cannot start."""
    from copilot.runtime.auth import dev_secret

    data = ROOT / ".copilot-data"
    mesh = PodmanMesh(
        data / "pods",
        orchestrator_port=int(argv[1]) if len(argv) > 1 else SERVICE_PORTS["orchestrator"],
        knowledge_port=int(argv[2]) if len(argv) > 2 else SERVICE_PORTS["knowledge"],
        secret=dev_secret(data / "auth" / "dev-jwt-secret"),
        network="copilot-pods",
    )
    if argv[:1] == ["down"]:
        mesh.stop()
        print("pods removed")
        return 0
    if argv[:1] != ["up"]:
        print("usage: python -m tests.containers.podman up [ORCHESTRATOR_PORT [KNOWLEDGE_PORT]] | down")
        return 2
    taken = [port for port in (mesh.orchestrator_port, mesh.knowledge_port) if port_in_use(port)]
    if taken:
        print(
            f"127.0.0.1:{', '.join(map(str, taken))} already in use: a local mesh (`make run` / `copilot up`) or pods "
            "of an earlier `make pods` are serving there. Stop that first (Ctrl-C the mesh, or `make pods-down`); "
            "nothing was started.",
            file=sys.stderr,
        )
        return 2
    try:
        mesh.start()
        ready = mesh.wait_ready()
    except (subprocess.CalledProcessError, TimeoutError) as failed:
        detail = failed.stderr if isinstance(failed, subprocess.CalledProcessError) else str(failed)
        print(f"the pods could not start: {(detail or str(failed)).strip()}", file=sys.stderr)
        mesh.stop()
        print("removed the pods that had started", file=sys.stderr)
        return 1
    for pod, seconds in ready.items():
        print(f"{mesh.container(pod):<34} SERVING after {seconds:5.1f} s")
    print(
        f"orchestrator on 127.0.0.1:{mesh.orchestrator_port}, knowledge on 127.0.0.1:{mesh.knowledge_port}; try: "
        ".venv/bin/copilot diagnose --plant PUNE-IN --equipment CNC-A-102 --problem 'Machine overheating during "
        "operation' (and `copilot docs`, `copilot ingest FILE`); stop with `make pods-down`"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
