"""An agent's image installs the base dependencies and its own extra only (deploy/docker/requirements.py): the shared
runtime must not make an orchestrator-only library (the rate limit's `limits`, the history's SQLAlchemy, LangGraph)
a dependency of every agent. Checked in a fresh interpreter where those imports fail, as they do in those images."""

from __future__ import annotations

import pytest

from tests.conftest import run_python

ORCHESTRATOR_ONLY = ("limits", "sqlalchemy", "alembic", "langgraph", "redis")


@pytest.mark.parametrize("agent", ["vision", "rag", "report"])
def test_an_agents_server_imports_without_the_orchestrators_libraries(agent):
    blocked = ", ".join(repr(name) for name in ORCHESTRATOR_ONLY)
    done = run_python(
        "import sys\n"
        f"for name in ({blocked}):\n"
        "    sys.modules[name] = None  # `import name` now raises ImportError, as in the agent's image\n"
        f"import services.{agent}.server\n"
        "import copilot_cli.app  # `copilot health` is every image's probe command\n",
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
