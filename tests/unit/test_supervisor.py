"""The restart policy of the local mesh's supervisor (the processes themselves: tests/integration/test_faults.py)."""

from __future__ import annotations

import signal

from copilot_cli.launcher import RestartPolicy, exit_reason, read_state


def test_back_off_doubles_from_one_second_to_thirty():
    policy = RestartPolicy()
    assert [policy.backoff(n) for n in range(1, 9)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_exit_reasons_name_the_signal_or_the_code():
    assert exit_reason(-signal.SIGKILL) == "SIGKILL"
    assert exit_reason(1) == "exit code 1"
    assert exit_reason(None) == "running"


def test_status_of_a_data_folder_without_a_live_supervisor_is_none(tmp_path):
    assert read_state(tmp_path) is None
    (tmp_path / "mesh-state.json").write_text('{"supervisor_pid": 999999999, "services": {}}')
    assert read_state(tmp_path) is None  # written by a supervisor that is gone
    (tmp_path / "mesh-state.json").write_text("{half")
    assert read_state(tmp_path) is None


class FakeHealth:
    """What the supervised process answers to health checks, step by step."""

    def __init__(self, answers):
        self.answers = list(answers)

    def __call__(self, *args, **kwargs):
        return self.answers.pop(0) if self.answers else None


def supervised_sleeper(tmp_path, monkeypatch, answers, policy):
    """A Supervisor over one real process (`sleep`) whose health answers are scripted."""
    import subprocess

    from copilot_cli import launcher

    mesh = launcher.Mesh.on_free_ports(data_dir=tmp_path)
    proc = launcher.ServiceProcess("report", mesh.ports["report"], {}, tmp_path / "report.log")
    started = []

    def spawn():
        proc.process = subprocess.Popen(["sleep", "60"])
        started.append(proc.process)

    proc.spawn = spawn
    spawn()
    mesh.services = {"report": proc}
    monkeypatch.setattr(launcher, "health_status", FakeHealth(answers))
    events = []
    supervisor = launcher.Supervisor(mesh, policy, events.append)
    return supervisor, proc, started, events


def test_a_serving_process_that_stops_answering_is_killed_and_restarted(tmp_path, monkeypatch):
    from copilot_cli.launcher import State

    serving = 1
    supervisor, proc, started, events = supervised_sleeper(
        tmp_path,
        monkeypatch,
        [serving, None, None, None, serving],
        RestartPolicy(liveness_period_s=0, liveness_failures=3, initial_backoff_s=0),
    )
    status = supervisor.status["report"]
    try:
        for now in range(1, 7):
            supervisor._step(proc, status, float(now))
        assert [e.kind for e in events] == ["serving", "hung", "crashed", "restarted", "serving"]
        assert started[0].returncode == -signal.SIGKILL and len(started) == 2
        assert status.state is State.SERVING and status.restarts == 1
        assert status.last_exit == "killed: 3 health checks failed"
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_start_that_never_reaches_serving_is_killed_like_a_failed_startup_probe(tmp_path, monkeypatch):
    supervisor, proc, started, events = supervised_sleeper(
        tmp_path, monkeypatch, [], RestartPolicy(startup_timeout_s=5, initial_backoff_s=0)
    )
    status = supervisor.status["report"]
    status.started_at = 0.0
    try:
        supervisor._step(proc, status, 1.0)
        assert events == []  # still starting
        supervisor._step(proc, status, 6.0)
        assert [e.kind for e in events] == ["hung", "crashed"] and "not SERVING 5s after its start" in events[0].reason
    finally:
        for process in started:
            process.kill()
            process.wait()
