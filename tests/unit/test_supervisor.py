"""The restart policy of the local mesh's supervisor (the processes themselves: tests/integration/test_faults.py)."""
from __future__ import annotations

import signal

from copilot.launcher import RestartPolicy, exit_reason, read_state


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
