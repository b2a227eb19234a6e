"""The CLI as a new user meets it: errors that say what to type, limits checked before sending, one data folder
whatever the current directory, `make pods` refusing a port a local mesh holds."""

from __future__ import annotations

import socket
from datetime import UTC, datetime, timedelta

import pytest
import typer
from typer.testing import CliRunner

from copilot.runtime import config
from copilot.runtime.validation import rule_violations
from copilot.v1 import copilot_pb2
from copilot_cli.app import app
from copilot_cli.common import parse_when

runner = CliRunner()


def test_times_are_read_as_a_technician_types_them():
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert parse_when("yesterday") == midnight - timedelta(days=1)
    assert parse_when("today") == midnight
    assert abs(parse_when("6h") - (now - timedelta(hours=6))) < timedelta(minutes=1)
    assert parse_when("2026-12-04") == datetime(2026, 12, 4, tzinfo=UTC)
    assert parse_when("2026-12-04T08:00+05:30") == datetime(2026, 12, 4, 2, 30, tzinfo=UTC)
    with pytest.raises(typer.BadParameter, match=r"expected an ISO date or time .* 'yesterday'"):
        parse_when("last tuesday")


def test_a_time_that_cannot_be_read_says_which_forms_are_accepted():
    result = runner.invoke(app, ["incidents", "--since", "yesterdy", "--addr", "127.0.0.1:1"])
    assert result.exit_code == 2
    assert "yesterday" in result.output and "2026-12-04" in result.output


def test_a_photo_over_the_limit_is_refused_before_anything_is_sent(tmp_path):
    photo = tmp_path / "big.jpg"
    photo.write_bytes(b"\xff\xd8\xff" + bytes(11 * 2**20))
    request = ["diagnose", "--plant", "PUNE-IN", "--equipment", "PUMP-A-7", "--problem", "Crack near the flange"]
    result = runner.invoke(app, [*request, "--image", str(photo), "--addr", "127.0.0.1:1"])
    assert result.exit_code == 2
    said = " ".join(result.output.split())
    assert "11.0 MiB" in said and "up to 10 MiB" in said and "nothing was sent" in said
    assert "UNAVAILABLE" not in result.output  # no call was tried


def test_a_pattern_rule_names_an_example_instead_of_the_regex():
    request = copilot_pb2.DiagnoseRequest(
        plant_id="pune",
        equipment_id="CNC-A-102",
        problem_description="Spindle overheating badly",
        equipment_type="Centrifugal Pump",
    )
    said = {v.field: v.description for v in rule_violations(request)}
    assert "PUNE-IN" in said["plant_id"] and "^" not in said["plant_id"]
    assert "centrifugal-pump" in said["equipment_type"]


def test_the_data_folder_is_the_checkouts_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("COPILOT_DATA_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    root = config.project_root()
    assert root is not None and (root / "pyproject.toml").is_file()
    assert config.data_dir() == root / ".copilot-data"
    monkeypatch.setenv("COPILOT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert config.data_dir() == tmp_path / "elsewhere"


def test_status_says_when_the_data_folder_does_not_exist(tmp_path):
    result = runner.invoke(app, ["status", "--data-dir", str(tmp_path / "missing")])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "no local mesh is running" in said and "does not exist" in said


def test_a_feedback_export_without_a_history_writes_nothing_and_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "feedback.yaml"
    result = runner.invoke(app, ["export-feedback", str(target), "--data-dir", str(tmp_path / "mesh")])
    assert result.exit_code == 1
    said = " ".join(result.output.split())
    assert "no incident history" in said and "--data-dir" in said
    assert not target.exists() and list(tmp_path.iterdir()) == []  # no database created anywhere


def test_make_pods_refuses_ports_a_local_mesh_holds_and_starts_nothing(capsys):
    from tests.containers import podman

    with socket.socket() as held, socket.socket() as free:
        held.bind(("127.0.0.1", 0))
        held.listen()
        held_port = held.getsockname()[1]
        free.bind(("127.0.0.1", 0))
        free_port = free.getsockname()[1]
        free.close()
        code = podman.main(["up", str(held_port), str(free_port)])
    said = capsys.readouterr().err
    assert code == 2
    assert f"127.0.0.1:{held_port} already in use" in said and "nothing was started" in said


def test_make_pods_publishes_the_knowledge_service_where_the_cli_looks_for_it(tmp_path):
    """`copilot docs` / `ingest` default to the local mesh's knowledge port: `make pods` publishes the knowledge pod's
    gRPC port there (on 127.0.0.1), and the orchestrator's, and no other pod's."""
    from tests.containers import podman

    plays = podman.for_podman(
        podman.render("dev"),
        tag="dev",
        secret_dir=tmp_path,
        orchestrator_port=50051,
        knowledge_port=50053,
        extra_config={},
    )
    published = {
        pod: port
        for pod, (_, workload) in plays.items()
        for container in workload["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", [])
        if port.get("hostPort")
    }
    assert {pod: (p["hostIP"], p["hostPort"], p["containerPort"]) for pod, p in published.items()} == {
        "orchestrator": ("127.0.0.1", 50051, podman.SERVICE_PORTS["orchestrator"]),
        "knowledge": ("127.0.0.1", 50053, podman.SERVICE_PORTS["knowledge"]),
    }
