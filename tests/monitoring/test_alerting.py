"""The alerts end to end with the real programs: the local mesh under a supervisor (what `copilot up` runs) and a
closed loop of diagnoses, a real Prometheus (the Debian package) scraping its four metrics ports with the rules
rendered from deploy/monitoring/slos.yaml at a shorter time scale, a real Alertmanager sending to a webhook this
test serves. Faults: an agent SIGSTOPped (then SIGCONTed), an agent SIGKILLed three times while the supervisor
restarts it. Every wait polls for a state (an alert's state, a webhook call) with a generous bound; nothing
asserts how long anything took."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
import yaml

from copilot import monitoring
from copilot.client import CHANNEL_OPTIONS, auth_metadata, diagnose_request
from copilot.monitoring import Source
from copilot.v1 import copilot_pb2_grpc
from copilot_cli.launcher import Mesh, RestartPolicy, free_port, kind_of
from tests.conftest import SAMPLES, wait_for

PROMETHEUS = shutil.which("prometheus")
ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or ALERTMANAGER is None,
    reason="prometheus / prometheus-alertmanager are not installed (Debian packages; `make install` installs them)",
)

#: one documented parameter: every window and `for:` of the rules is 1/30 of the production value
TIME_SCALE = 1 / 30


class Webhook:
    """Alertmanager's webhook receiver: keeps every notification it is sent."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def notifications(self, alertname: str, status: str) -> list[dict]:
        return [n for n in self.received if n["groupLabels"].get("alertname") == alertname and n["status"] == status]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    """(mesh, prometheus URL, webhook) with load running; everything stopped at the end."""
    tmp = tmp_path_factory.mktemp("alerting")
    mesh = Mesh.on_free_ports(data_dir=tmp / "mesh")
    mesh.start()
    processes: list[subprocess.Popen] = []
    stop_load = threading.Event()
    try:
        mesh.wait_ready(timeout=300)
        mesh.supervise(RestartPolicy(stable_after_s=5))
        rules = tmp / "rules.yaml"
        rules.write_text(yaml.safe_dump(monitoring.rules_file(Source.load(), time_scale=TIME_SCALE)))
        webhook = Webhook()
        am_port, prom_port = free_port(), free_port()
        am_config = tmp / "alertmanager.yml"
        am_config.write_text(
            yaml.safe_dump(
                {
                    "route": {
                        "receiver": "test",
                        "group_by": ["alertname", "job"],
                        "group_wait": "1s",
                        "group_interval": "2s",
                        "repeat_interval": "1h",
                    },
                    "receivers": [{"name": "test", "webhook_configs": [{"url": webhook.url, "send_resolved": True}]}],
                }
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    ALERTMANAGER,
                    f"--config.file={am_config}",
                    f"--storage.path={tmp / 'am'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                stdout=(tmp / "alertmanager.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        targets: dict[str, list[str]] = {}
        for name in mesh.names:
            targets.setdefault(kind_of(name), []).append(f"127.0.0.1:{mesh.metrics_ports[name]}")
        config = tmp / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                monitoring.scrape_config(
                    targets, rule_files=[str(rules)], alertmanager=f"127.0.0.1:{am_port}", interval="1s"
                )
            )
        )
        processes.append(
            subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                    "--enable-feature=exemplar-storage",
                ],
                stdout=(tmp / "prometheus.log").open("w"),
                stderr=subprocess.STDOUT,
            )
        )
        prometheus = f"http://127.0.0.1:{prom_port}"
        _warm_up(mesh.address("orchestrator"))  # first calls load lazily: not what the latency SLOs are about
        load = threading.Thread(target=_load, args=(mesh.address("orchestrator"), stop_load), daemon=True)
        load.start()
        yield mesh, prometheus, webhook
    finally:
        stop_load.set()
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
        mesh.stop()


def _warm_up(address: str) -> None:
    photo = (SAMPLES / "pump-housing-crack.jpg").read_bytes()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)
        for image in (photo, None, photo, None):
            request = diagnose_request("PUNE-IN", "CNC-A-102", "Machine overheating during operation", image)
            stub.Diagnose(request, metadata=auth_metadata("technician-sre"), timeout=60)


def _load(address: str, stop: threading.Event) -> None:
    """A paced loop of diagnoses, one in five with a photo, until `stop` (errors are what the alerts are for)."""
    photo = (SAMPLES / "pump-housing-crack.jpg").read_bytes()
    problems = ("Machine overheating during operation", "Spindle vibration and noise at high speed")
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)
        i = 0
        while not stop.is_set():
            i += 1
            request = diagnose_request("PUNE-IN", "CNC-A-102", problems[i % 2], photo if i % 5 == 0 else None)
            with contextlib.suppress(grpc.RpcError):  # errors are what the alerts are for
                stub.Diagnose(request, metadata=auth_metadata("technician-sre"), timeout=30)
            stop.wait(0.25)  # paced (at most 4 a second): well within the rate limit, as a technician's client


def query(prometheus: str, expr: str) -> list[dict]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    answer = get_json(url)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def alerts(prometheus: str, state: str = "firing") -> list[dict]:
    return [a for a in get_json(f"{prometheus}/api/v1/alerts")["data"]["alerts"] if a["state"] == state]


def test_alerts_fire_on_faults_reach_alertmanager_and_resolve(observed):
    mesh, prometheus, webhook = observed
    # steady state: every service scraped, the SLO ratios computed over their longest window, nothing firing
    wait_for(lambda: len(query(prometheus, 'up{job=~"copilot-.*"} == 1')) == 4, "four services scraped")
    wait_for(
        lambda: query(prometheus, 'copilot:slo_errors:ratio_rate1h{slo="diagnosis-availability"}'),
        "the availability SLI over its 1 h (scaled) window",
    )
    time.sleep(monitoring.seconds("1h") * TIME_SCALE)  # one long window of steady load
    assert alerts(prometheus) == [], alerts(prometheus)
    assert not webhook.received

    # an agent hung: its scrape fails -> CopilotServiceDown fires in Prometheus and reaches the webhook
    report = mesh.services["report"].handle
    stopped_at = time.monotonic()
    report.send_signal(signal.SIGSTOP)
    try:
        wait_for(
            lambda: [
                a
                for a in alerts(prometheus)
                if a["labels"]["alertname"] == "CopilotServiceDown" and a["labels"]["job"] == "copilot-report"
            ],
            "CopilotServiceDown firing for the report pod",
        )
        fired_after = time.monotonic() - stopped_at
        notified = wait_for(lambda: webhook.notifications("CopilotServiceDown", "firing"), "the webhook is notified")
        assert notified[0]["groupLabels"] == {"alertname": "CopilotServiceDown", "job": "copilot-report"}
        assert notified[0]["commonLabels"]["severity"] == "page"
        assert notified[0]["commonAnnotations"]["runbook_url"] == "docs/runbook.md#service-down"
    finally:
        report.send_signal(signal.SIGCONT)
    wait_for(lambda: webhook.notifications("CopilotServiceDown", "resolved"), "CopilotServiceDown resolved")
    print(f"CopilotServiceDown fired {fired_after:.1f} s after SIGSTOP (time scale {TIME_SCALE:.4f})")

    # an agent killed three times, the supervisor restarting it each time -> CopilotPodRestarting
    def start_time() -> str | None:
        found = query(prometheus, 'process_start_time_seconds{job="copilot-report"}')
        return found[0]["value"][1] if found else None

    for _ in range(3):
        before = wait_for(start_time, "the report agent scraped")
        mesh.services["report"].handle.send_signal(signal.SIGKILL)
        # the supervisor restarts it; Prometheus scrapes the new process
        wait_for(lambda before=before: start_time() not in (None, before), "Prometheus sees the restarted process")
    third_restart_seen = time.monotonic()
    wait_for(
        lambda: [a for a in alerts(prometheus) if a["labels"]["alertname"] == "CopilotPodRestarting"],
        "CopilotPodRestarting firing",
    )
    print(
        f"CopilotPodRestarting fired {time.monotonic() - third_restart_seen:.1f} s after the third restart was scraped"
    )
    wait_for(lambda: webhook.notifications("CopilotPodRestarting", "firing"), "the webhook is notified of restarts")


def test_every_dashboard_panel_returns_data(observed):
    _, prometheus, _ = observed
    wait_for(
        lambda: (
            query(prometheus, "copilot_vision_batch_size_count")
            and query(prometheus, "copilot:slo_error_budget:remaining")
        ),
        "photo diagnoses and the budget rule evaluated",
    )
    board = monitoring.dashboard(time_scale=TIME_SCALE)
    for title, expr in monitoring.dashboard_queries(board):
        assert wait_for(lambda expr=expr: query(prometheus, expr), f"data for panel {title!r}: {expr}"), title


def test_the_rules_loaded_are_the_rendered_ones(observed):
    _, prometheus, _ = observed
    loaded = get_json(f"{prometheus}/api/v1/rules")["data"]["groups"]
    expected = monitoring.rules_file(Source.load(), time_scale=TIME_SCALE)["groups"]
    # Prometheus lists the groups by name; each group's rules in file order
    assert {g["name"]: [r["name"] for r in g["rules"]] for g in loaded} == {
        g["name"]: [r.get("alert") or r.get("record") for r in g["rules"]] for g in expected
    }
    assert all(g["rules"] and all(r["health"] == "ok" for r in g["rules"]) for g in loaded), loaded
