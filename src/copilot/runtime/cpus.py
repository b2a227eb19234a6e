"""How many CPUs this process may really use: the container's CPU limit, not the node's cores. A pod limited to
2 CPUs on a 64-core node that sizes its thread pools by `os.sched_getaffinity` (64) runs 64 threads into a 2-CPU
quota and is throttled; the cgroup's quota says 2."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def cgroup_cpu_limit(cpu_max: Path = CGROUP_CPU_MAX) -> int | None:
    """The cgroup v2 CPU quota rounded up (`200000 100000` -> 2, `150000 100000` -> 2); None without a limit."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may use: those it may be scheduled on, capped by the container's CPU limit."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(cpu_max)
    return max(1, min(cpus, limit) if limit else cpus)
