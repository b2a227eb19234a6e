"""Shared fixtures: the real embedding model and a real Chroma store, loaded once per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every server the tests start (in-process or as a process) authenticates with these: dev mode (the dev
# technician-<id> tokens) plus HS256 JWTs signed with TEST_SECRET.
TEST_SECRET = "test-secret-for-the-copilot-suite-0123456789"
os.environ["AUTH_MODE"] = "dev"
os.environ["AUTH_JWT_SECRET"] = TEST_SECRET
for _name in ("AUTH_JWT_SECRET_FILE", "AUTH_JWT_PUBLIC_KEY_FILE"):
    os.environ.pop(_name, None)


def token(role: str = "technician", subject: str = "") -> str:
    """A JWT every test server accepts."""
    from copilot.runtime.auth import Role, mint_token

    return mint_token(subject or f"{role}-test", Role.parse(role), secret=TEST_SECRET)


ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "src" / "copilot_cli" / "samples"


def run_python(script: str, *, timeout: float, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter (this venv's) with only the repository on its path: nothing this test process
    imported, set or allocated is there. A script that outlives `timeout` fails the test (TimeoutExpired)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{ROOT}:{ROOT / 'src'}"}
    if home is not None:
        env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def embedder():
    from services.rag.embedders import minilm_embedder

    return minilm_embedder()


@pytest.fixture(scope="session")
def knowledge_base(tmp_path_factory, embedder):
    from services.rag.core import KnowledgeBase, open_store
    from services.rag.corpus import starter_corpus

    kb = KnowledgeBase(open_store(tmp_path_factory.mktemp("chroma")), embedder)
    kb.ensure_documents(starter_corpus())
    return kb


@pytest.fixture(scope="session")
def crack_photo() -> bytes:
    return (SAMPLES / "pump-housing-crack.jpg").read_bytes()


@pytest.fixture(scope="session")
def clean_photo() -> bytes:
    return (SAMPLES / "pump-housing-clean.jpg").read_bytes()


@pytest.fixture(scope="session")
def feature_extractor():
    from services.vision import backbone

    return backbone.feature_extractor()


@pytest.fixture(scope="session")
def vision_engine(tmp_path_factory, feature_extractor):
    """The reference engine on a copy of the shipped starter set."""
    from services.vision.core import VisionEngine
    from services.vision.references import ReferenceStore

    engine = VisionEngine(feature_extractor, ReferenceStore(tmp_path_factory.mktemp("vision-refs")))
    engine.seed_starter_set()
    engine.load()
    return engine


#: Fixtures that load model weights or build reference sets: a test using one (directly or through another
#: fixture) is marked `models` and left out of `make check`, the fast loop.
MODEL_FIXTURES = frozenset(
    {
        "embedder",
        "knowledge_base",
        "feature_extractor",
        "vision_engine",
        "vision_server",
        "knowledge_server",
        "copilot_server",
    }
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.models)


def wait_for(condition, what: str, bound_s: float = 180.0, every_s: float = 0.5):
    """Polls `condition` until it gives something truthy and returns that; fails after a generous bound. A wait
    for a state, never a claim about how long anything takes."""
    import time

    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"never happened within {bound_s:.0f} s: {what}")
