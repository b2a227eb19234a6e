"""The NetworkPolicies of each overlay, evaluated as a cluster's network plugin would: every dependency the
rendered configuration names (agents, Chroma, the collector, Jaeger, Redis, PostgreSQL, a hosted model server, DNS)
is reachable from the pods that use it, and nothing else is (an allowed path to a port some pod listens on must be
one the configuration uses). The overlays are rendered by kustomize; a components-only overlay (prod + hosted models)
is rendered from a temporary kustomization."""

from __future__ import annotations

import copy
import os
import subprocess
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import yaml

from .conftest import DEPLOY
from .test_kubernetes import KUBECTL, copilot_config, render

SERVICES = ("orchestrator", "vision", "knowledge", "report")
DNS = ("kube-system", 53)
# who reaches the mesh from outside it, and on which ports (the Ingress controller; Prometheus scraping /metrics)
FROM_OUTSIDE = {
    "ingress-nginx": {"orchestrator": {50051}},
    "monitoring": {s: {p} for s, p in zip(SERVICES, range(9464, 9468), strict=True)},
}


@dataclass(frozen=True)
class Pod:
    name: str
    labels: tuple[tuple[str, str], ...]
    ports: frozenset[int]

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)


def matches(selector: dict | None, labels: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions); an empty one selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


class Network:
    """Pods, Services and NetworkPolicies of one rendered overlay (one namespace)."""

    def __init__(self, docs: list[dict]) -> None:
        self.namespace = next(d["metadata"]["name"] for d in docs if d["kind"] == "Namespace")
        self.pods: dict[str, Pod] = {}
        for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
            template = workload["spec"]["template"]
            ports = frozenset(p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", []))
            labels = tuple(sorted(template["metadata"]["labels"].items()))
            self.pods[workload["metadata"]["name"]] = Pod(workload["metadata"]["name"], labels, ports)
        self.services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
        self.policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy"]

    def behind(self, service: str, port: int) -> list[tuple[Pod, int]]:
        """The pods a Service name sends to and the pod port a Service port lands on."""
        spec = self.services[service]["spec"]
        (service_port,) = [p for p in spec["ports"] if p["port"] == port]
        pods = [pod for pod in self.pods.values() if matches({"matchLabels": spec["selector"]}, pod.label_map)]
        found = []
        for pod in pods:
            target = service_port.get("targetPort", port)
            if isinstance(target, str):  # a named port: the pod's port of that name (ours name them as they listen)
                target = port if port in pod.ports else target
            found.append((pod, int(target)))
        return found

    def _rules(self, pod: Pod, direction: str) -> list[dict] | None:
        """The rules that apply to a pod in one direction; None when no policy isolates it (all allowed)."""
        policy_type = direction.capitalize()
        selecting = [
            p
            for p in self.policies
            if policy_type in p.get("policyTypes", []) and matches(p["podSelector"], pod.label_map)
        ]
        if not selecting:
            return None
        return [rule for p in selecting for rule in p.get(direction, [])]

    def _peer_matches(self, peer: dict, namespace: str, labels: dict[str, str] | None) -> bool:
        """Does one `to` / `from` entry cover a pod (labels, or None for a peer known by namespace only)?"""
        if "ipBlock" in peer:
            return False  # no dependency here is addressed by IP
        if "namespaceSelector" in peer:
            if not matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": namespace}):
                return False
        elif namespace != self.namespace:
            return False
        if "podSelector" in peer and labels is not None:
            return matches(peer["podSelector"], labels)
        return "podSelector" not in peer or labels is None

    @staticmethod
    def _port_ok(rule: dict, port: int) -> bool:
        return not rule.get("ports") or any(p.get("port") == port for p in rule["ports"])

    def egress(self, pod: Pod, namespace: str, labels: dict[str, str] | None, port: int) -> bool:
        rules = self._rules(pod, "egress")
        if rules is None:
            return True
        return any(
            self._port_ok(rule, port)
            and (not rule.get("to") or any(self._peer_matches(peer, namespace, labels) for peer in rule["to"]))
            for rule in rules
        )

    def ingress(self, pod: Pod, namespace: str, labels: dict[str, str] | None, port: int) -> bool:
        rules = self._rules(pod, "ingress")
        if rules is None:
            return True
        return any(
            self._port_ok(rule, port)
            and (not rule.get("from") or any(self._peer_matches(peer, namespace, labels) for peer in rule["from"]))
            for rule in rules
        )


def host_port(address: str) -> tuple[str, int]:
    """`dns:///vision:50052`, `http://otel-collector:4317`, `redis://redis:6379`, `chroma` + port -> (host, port)."""
    if address.startswith("dns:///"):
        address = "tcp://" + address[len("dns:///") :]
    parts = urlsplit(address)
    return parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)


def outside(host: str) -> str | None:
    """`name.namespace.svc[.cluster.local]` -> namespace, when that is another namespace's Service."""
    pieces = host.split(".")
    return pieces[1] if len(pieces) >= 3 and pieces[2] == "svc" else None


def dependencies(docs: list[dict]) -> tuple[set, set]:
    """What the configuration uses: (in-namespace paths (client, server pod, port), paths out of it (client,
    namespace, port)), from copilot-config, the collector's own config and the external Services they name."""
    config = copilot_config(docs)
    net = Network(docs)
    inside: set[tuple[str, str, int]] = set()
    out: set[tuple[str, str, int]] = set()

    def uses(client: str, host: str, port: int) -> None:
        namespace = outside(host)
        if namespace and namespace != net.namespace:
            out.add((client, namespace, port))
            return
        for pod, pod_port in net.behind(host.split(".")[0], port):
            inside.add((client, pod.name, pod_port))

    for agent in ("vision", "knowledge", "report"):
        uses("orchestrator", *host_port(config[f"{agent.upper()}_ADDR"]))
    uses("knowledge", config["KNOWLEDGE_CHROMA_HOST"], int(config["KNOWLEDGE_CHROMA_PORT"]))
    for service in SERVICES:
        uses(service, *host_port(config["OTEL_EXPORTER_OTLP_ENDPOINT"]))
    collector_config = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("otel-collector-config")
    )
    for exporter in yaml.safe_load(collector_config["data"]["config.yaml"])["exporters"].values():
        uses("otel-collector", *host_port("tcp://" + exporter["endpoint"]))
    if config.get("ORCHESTRATOR_RATE_LIMIT_STORAGE", "memory://").startswith("redis"):
        uses("orchestrator", *host_port(config["ORCHESTRATOR_RATE_LIMIT_STORAGE"]))
    if config.get("PGHOST"):
        uses("orchestrator", config["PGHOST"], int(config.get("PGPORT", "5432")))
    if config.get("KNOWLEDGE_MODEL_ENDPOINT"):
        uses("knowledge", *host_port(config["KNOWLEDGE_MODEL_ENDPOINT"]))
    for pod in net.pods:
        out.add((pod, *DNS))
    return inside, out


def problems(docs: list[dict]) -> list[str]:
    """Every used path that the policies block, and every allowed path to a listening port that nothing uses."""
    net = Network(docs)
    inside, out = dependencies(docs)
    found = []
    for client, server, port in sorted(inside):
        a, b = net.pods[client], net.pods[server]
        if not net.egress(a, net.namespace, b.label_map, port):
            found.append(f"blocked: {client} -> {server}:{port} (no egress rule)")
        if not net.ingress(b, net.namespace, a.label_map, port):
            found.append(f"blocked: {client} -> {server}:{port} (no ingress rule)")
    for client, namespace, port in sorted(out):
        if not net.egress(net.pods[client], namespace, None, port):
            found.append(f"blocked: {client} -> namespace {namespace}:{port}")
    for namespace, servers in FROM_OUTSIDE.items():
        for server, ports in servers.items():
            for port in ports:
                if not net.ingress(net.pods[server], namespace, None, port):
                    found.append(f"blocked: namespace {namespace} -> {server}:{port}")
    # nothing else: within the namespace, every (client, server, listening port) the policies allow is used ...
    for a in net.pods.values():
        for b in net.pods.values():
            for port in b.ports:
                if a is b or (a.name, b.name, port) in inside:
                    continue
                if net.egress(a, net.namespace, b.label_map, port) and net.ingress(b, net.namespace, a.label_map, port):
                    found.append(f"open but unused: {a.name} -> {b.name}:{port}")
    # ... and every path out of it is one the configuration names (probing the ports any dependency here uses)
    probe_ports = {port for _, _, port in out} | {443, 80, 5432, 6379, 8000}
    for a in net.pods.values():
        for namespace in {ns for _, ns, _ in out} | {"default", "some-other-namespace"}:
            for port in probe_ports:
                if (a.name, namespace, port) not in out and net.egress(a, namespace, None, port):
                    found.append(f"open but unused: {a.name} -> namespace {namespace}:{port}")
    return found


def render_with(tmp_path, overlay: str, components: list[str]) -> list[dict]:
    """An overlay with more components, as a team would write its own (kustomize wants relative paths)."""
    folder = tmp_path / "overlay"
    folder.mkdir()
    k8s = DEPLOY / "k8s"
    (folder / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(k8s / "overlays" / overlay, folder)],
                "components": [os.path.relpath(k8s / "components" / c, folder) for c in components],
            }
        )
    )
    out = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", ["dev", "prod", "prod-gpu"])
def test_every_configured_dependency_is_reachable_and_nothing_else(overlay):
    docs = render(overlay)
    assert problems(docs) == []
    inside, out = dependencies(docs)
    assert ("orchestrator", "vision", 50052) in inside and ("knowledge", "chroma", 8000) in inside
    if overlay != "dev":  # the shared stores of several orchestrator replicas
        assert ("orchestrator", "redis", 6379) in inside
        assert ("orchestrator", "databases", 5432) in out


def test_a_hosted_model_server_is_reachable_from_knowledge_only(tmp_path):
    docs = render_with(tmp_path, "prod", ["hosted-models"])
    assert problems(docs) == []
    _, out = dependencies(docs)
    assert ("knowledge", "models", 8000) in out


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        # the prod database's egress rule left out: the orchestrators could not store an incident
        (
            lambda docs: [d for d in docs if d["metadata"]["name"] != "orchestrator-to-database"],
            "blocked: orchestrator -> namespace databases:5432",
        ),
        # PostgreSQL moved without its policy
        (lambda docs: _set_config(docs, "PGPORT", "6432"), "blocked: orchestrator -> namespace databases:6432"),
        # Redis opened to every pod of the namespace
        (
            lambda docs: _widen(docs, "redis-from-orchestrator", "ingress", "from"),
            "open but unused: vision -> redis:6379",
        ),
    ],
)
def test_the_evaluation_catches_a_missing_and_a_too_wide_rule(mutate, expected):
    docs = mutate(copy.deepcopy(render("prod")))
    if "open but unused" in expected:  # a too-wide ingress needs a matching egress to be a path: open vision's too
        docs = _widen(docs, "services-to-collector", "egress", "to")
    assert expected in problems(docs)


def _set_config(docs: list[dict], name: str, value: str) -> list[dict]:
    for d in docs:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("copilot-config-"):
            d["data"][name] = value
    return docs


def _widen(docs: list[dict], policy: str, direction: str, peers: str) -> list[dict]:
    for d in docs:
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == policy:
            for rule in d["spec"][direction]:
                rule.pop(peers, None)
                rule.pop("ports", None)
    return docs
