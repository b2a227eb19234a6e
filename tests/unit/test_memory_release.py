"""The allocator settings every service process starts with (copilot.runtime.memory), in fresh interpreters."""

from __future__ import annotations

import json

from tests.conftest import run_python

PROBE = """
import json, os, sys
from copilot.runtime.memory import return_freed_memory

def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20

applied = return_freed_memory() if "--default" not in sys.argv else None
large = bytearray(30 * 2**20)
del large  # one large block freed: glibc's default then takes blocks up to 30 MiB from its heap
base = rss()
blocks, kept = [], []
for _ in range(40):  # a burst of 40 photo-sized buffers (240 MiB), each followed by a little that stays
    blocks.append(bytearray(6 * 2**20))
    kept.append(bytearray(4096))
peak = rss()
del blocks
print(json.dumps({"applied": applied, "held_after_free_mib": rss() - base, "burst_mib": peak - base}))
"""


def test_a_burst_of_large_buffers_goes_back_to_the_system_once_freed():
    done = run_python(PROBE, timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["applied"] is True
    assert figures["burst_mib"] > 200  # the buffers were really resident
    assert figures["held_after_free_mib"] < 20, figures
    # the same burst under glibc's defaults stays with the process: what the setting is for
    control = run_python(PROBE.replace('"--default" not in sys.argv', "False"), timeout=120)
    assert json.loads(control.stdout)["held_after_free_mib"] > 200


def test_an_operators_malloc_environment_is_left_to_rule():
    done = run_python("import os; os.environ['MALLOC_ARENA_MAX'] = '4'\n" + PROBE, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["applied"] is False
