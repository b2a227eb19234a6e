"""Rollouts that cut no call: each Deployment's shutdown budget derived from one source, the stage deadlines in
copilot.env, and each startup budget from the cold starts the container test measured.

A pod stopping: the kubelet runs preStop (PRESTOP_S: the endpoint leaves every Service, client and proxy first),
then SIGTERM; the server turns NOT_SERVING and gives calls in flight <PREFIX>_GRACE_SECONDS, then flushes its
telemetry within 3 s. So:
  drain  = the longest call it serves + MARGIN_S (orchestrator: the three stage deadlines; an agent: its own)
  grace  = PRESTOP_S + drain + MARGIN_S   (terminationGracePeriodSeconds)
When a deadline changes, the failure message says which values to write."""

from __future__ import annotations

import json
import math

import pytest

from .test_kubernetes import DEPLOY, by_kind, copilot_config, render

PRESTOP_S = 5
MARGIN_S = 5
STARTUP_MARGIN = 3  # x the slowest measured cold start: these machines vary 2x from hour to hour
RECORDED = DEPLOY.parent / "benchmarks" / "recorded" / "containers-2core.json"
PREFIX = {"orchestrator": "ORCHESTRATOR", "vision": "VISION", "knowledge": "KNOWLEDGE", "report": "REPORT"}


def expected_budgets(config: dict[str, str]) -> dict[str, tuple[int, int]]:
    deadline = {
        stage: float(config[f"ORCHESTRATOR_{stage.upper()}_TIMEOUT_S"]) for stage in ("vision", "knowledge", "report")
    }
    longest = {"orchestrator": sum(deadline.values()), **deadline}
    budgets = {}
    for service, seconds in longest.items():
        drain = math.ceil(seconds) + MARGIN_S
        budgets[service] = (drain, PRESTOP_S + drain + MARGIN_S)
    return budgets


@pytest.mark.parametrize("overlay", ["dev", "prod", "prod-gpu"])
def test_shutdown_budgets_follow_the_stage_deadlines(overlay):
    docs = render(overlay)
    deployments = by_kind(docs, "Deployment")
    wrong = []
    for service, (drain, grace) in expected_budgets(copilot_config(docs)).items():
        pod = deployments[service]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        have = (int(env[f"{PREFIX[service]}_GRACE_SECONDS"]), pod["terminationGracePeriodSeconds"])
        if have != (drain, grace):
            wrong.append(
                f"{service}: {PREFIX[service]}_GRACE_SECONDS={have[0]} terminationGracePeriodSeconds={have[1]}; "
                f"write {drain} and {grace}"
            )
        assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)], service
    assert wrong == []


def test_the_budget_rule_answers_a_changed_deadline():
    config = {
        "ORCHESTRATOR_VISION_TIMEOUT_S": "10",
        "ORCHESTRATOR_KNOWLEDGE_TIMEOUT_S": "45",
        "ORCHESTRATOR_REPORT_TIMEOUT_S": "5",
    }
    budgets = expected_budgets(config)
    assert budgets["orchestrator"] == (65, 75) and budgets["knowledge"] == (50, 60)


@pytest.mark.parametrize("overlay", ["dev", "prod", "prod-gpu"])
def test_startup_budgets_cover_the_measured_cold_starts_with_margin(overlay):
    runs = json.loads(RECORDED.read_text())["runs"]
    slowest: dict[str, float] = {}
    for run in runs:
        for pod, seconds in run["cold_start_s"].items():
            service = pod.split("-")[0] if pod.startswith("vision") else pod
            slowest[service] = max(slowest.get(service, 0.0), seconds)
    docs = render(overlay)
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    for service, seconds in slowest.items():
        (container,) = workloads[service]["spec"]["template"]["spec"]["containers"]
        probe = container["startupProbe"]
        budget = probe["periodSeconds"] * probe["failureThreshold"]
        assert budget >= STARTUP_MARGIN * seconds, (service, budget, seconds)
