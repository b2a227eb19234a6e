"""The incident history on every database it supports, the same tests each: SQLite (the default) and a real
PostgreSQL server started by the test (initdb + pg_ctl from the machine's PostgreSQL; skipped where none is
installed). Two stores on one database stand for two orchestrator replicas."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from copilot.domain import DiagnosisInput
from copilot_cli.launcher import free_port
from services.orchestrator.history import IncidentStore, RequestIdConflict, StoredFeedback, StoredIncident
from services.orchestrator.recorder import request_fingerprint

pytestmark = pytest.mark.integration


def _postgres_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on a free port (run as the `postgres` user when the tests run as root)."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries on this machine (initdb/pg_ctl)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="copilot-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the server as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()

    def run(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "copilot", "--auth=trust", "-E", "UTF8")
    run(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(folder / "server.log"),
        "-w",
        "-o",
        f"-p {port} -k {folder} -c listen_addresses=127.0.0.1",
        "start",
    )
    try:
        yield f"postgresql+psycopg://copilot@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True, timeout=60
        )
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'incidents.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)  # a clean schema per test: the store migrates it from nothing
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


def incident(
    request_id: str,
    *,
    equipment="CNC-A-102",
    problem="Spindle overheating during the shift",
    minutes_ago: float = 0,
    image: bytes = b"",
) -> tuple[StoredIncident, bytes]:
    import hashlib

    source = DiagnosisInput("PUNE-IN", equipment, problem, image_data=image)
    image_sha256 = hashlib.sha256(image).hexdigest() if image else ""
    return StoredIncident(
        request_id=request_id,
        created_at=datetime.now(UTC) - timedelta(minutes=minutes_ago),
        plant_id="PUNE-IN",
        equipment_id=equipment,
        equipment_type="",
        problem_description=problem,
        image_sha256=image_sha256,
        image_mime_type="image/png" if image else "",
        principal="anna",
        trace_id="ab" * 16,
        confidence=0.7,
        requires_manual_review=False,
        referenced_sop_ids=("SOP-123",),
        response=b"\x08\x01",
        input_fingerprint=request_fingerprint(source, image_sha256),
        stages=({"stage": "knowledge", "state": "ok", "error": ""},),
    ), image


def test_save_get_and_idempotent_retries(database_url):
    store = IncidentStore(database_url)
    try:
        first, image = incident("r-1", image=b"\x89PNG fake bytes")
        assert store.save(first, image) is first
        again = store.save(*incident("r-1", image=b"\x89PNG fake bytes"))
        assert again.request_id == "r-1" and again.created_at == first.created_at  # the stored one came back
        with pytest.raises(RequestIdConflict):
            store.save(*incident("r-1", problem="Something else entirely"))
        got = store.get("r-1")
        assert got.stages == first.stages and got.referenced_sop_ids == ("SOP-123",)
        assert got.created_at.tzinfo is not None
        assert store.image(first.image_sha256) == b"\x89PNG fake bytes"
        store.save(*incident("r-2", image=b"\x89PNG fake bytes"))  # the same image is stored once
        assert store.get("missing") is None
    finally:
        store.close()


def test_photos_past_retention_lose_their_bytes_not_their_incidents(database_url):
    store = IncidentStore(database_url)
    days = 24 * 60
    try:
        old, recent = b"\x89PNG old photo", b"\x89PNG photo sent again lately"
        for request_id, photo, minutes_ago in (
            ("r-1", old, 100 * days),
            ("r-2", old, 95 * days),
            ("r-3", recent, 100 * days),
            ("r-4", recent, 1),
        ):
            store.save(*incident(request_id, image=photo, minutes_ago=minutes_ago))
        cutoff = datetime.now(UTC) - timedelta(days=90)
        assert store.expire_photos(cutoff) == (1, len(old))
        expired = store.get("r-1").image_sha256
        assert expired and store.image(expired) is None  # the incident keeps the hash: evidence of what was sent
        assert store.image(store.get("r-4").image_sha256) == recent  # its newest incident is within retention
        assert store.expire_photos(cutoff) == (0, 0)  # idempotent: every replica may run it
        store.save(*incident("r-5", image=old))  # sent again: the bytes come back with the new incident
        assert store.image(expired) == old
    finally:
        store.close()


def test_the_feedback_cap_holds_exactly_under_concurrent_writers_on_two_replicas(database_url):
    replicas = [IncidentStore(database_url), IncidentStore(database_url)]
    try:
        replicas[0].save(*incident("fb-1"))
        note = StoredFeedback(False, "flood", (), "mallory", datetime.now(UTC))
        with ThreadPoolExecutor(16) as pool:
            outcomes = [o for o, _ in pool.map(lambda i: replicas[i % 2].add_feedback("fb-1", note, 20), range(80))]
        assert outcomes.count("added") == 20 and outcomes.count("full") == 60
        assert len(replicas[1].get("fb-1").feedback) == 20
    finally:
        for store in replicas:
            store.close()


def test_a_feedback_id_stores_an_entry_once_across_replicas_and_refuses_other_content(database_url):
    replicas = [IncidentStore(database_url), IncidentStore(database_url)]
    try:
        replicas[0].save(*incident("fb-key"))
        note = StoredFeedback(
            False,
            "Replaced the seal",
            ("SOP-123",),
            "anna",
            datetime.now(UTC),
            verdict="unspecified",
            feedback_id="k-1",
        )
        with ThreadPoolExecutor(8) as pool:
            outcomes = [o for o, _ in pool.map(lambda i: replicas[i % 2].add_feedback("fb-key", note, 20), range(8))]
        assert outcomes.count("added") == 1 and outcomes.count("replayed") == 7
        (stored,) = replicas[1].get("fb-key").feedback
        assert (stored.said, stored.feedback_id, stored.resolution_notes) == ("unspecified", "k-1", "Replaced the seal")
        other = StoredFeedback(
            True, "Something else", (), "anna", datetime.now(UTC), verdict="helpful", feedback_id="k-1"
        )
        outcome, before = replicas[0].add_feedback("fb-key", other, 20)
        assert outcome == "conflict" and before is not None and before.resolution_notes == "Replaced the seal"
        assert len(replicas[0].get("fb-key").feedback) == 1
        export = [e for e in replicas[0].feedback_export() if e["request_id"] == "fb-key"]
        assert [e["verdict"] for e in export] == ["unspecified"]
    finally:
        for store in replicas:
            store.close()


def test_two_replicas_racing_on_one_request_id_store_it_once(database_url):
    replicas = [IncidentStore(database_url), IncidentStore(database_url)]
    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda n: replicas[n % 2].save(incident("race-1")[0]), range(8)))
        assert len({r.created_at for r in results}) == 1
        page, _ = replicas[0].list()
        assert [i.request_id for i in page] == ["race-1"]
    finally:
        for store in replicas:
            store.close()


def test_list_pages_filters_and_similar_incidents(database_url):
    store = IncidentStore(database_url)
    try:
        for n in range(5):
            store.save(incident(f"i-{n}", equipment="PUMP-B-3" if n == 2 else "CNC-A-102", minutes_ago=10 - n)[0])
        seen, after = [], None
        while True:
            page, after = store.list(limit=2, after=after)
            seen += [i.request_id for i in page]
            if after is None:
                break
        assert seen == ["i-4", "i-3", "i-2", "i-1", "i-0"]
        pumps, _ = store.list(equipment_id="PUMP-B-3")
        assert [i.request_id for i in pumps] == ["i-2"]
        recent, _ = store.list(start=datetime.now(UTC) - timedelta(minutes=7.5))
        assert [i.request_id for i in recent] == ["i-4", "i-3"]
        store.add_feedback(
            "i-1", StoredFeedback(True, "Cleaned the coolant filter", ("SOP-123",), "ben", datetime.now(UTC))
        )
        similar = store.similar("PUNE-IN", "CNC-A-102", "Spindle overheating again", exclude="i-4", limit=2)
        assert [p.request_id for p in similar] == ["i-3", "i-1"]
        notes = {
            p.request_id: p.resolution_notes
            for p in store.similar("PUNE-IN", "CNC-A-102", "Spindle overheating", limit=5)
        }
        assert notes == {"i-4": "", "i-3": "", "i-1": "Cleaned the coolant filter", "i-0": ""}
        missing = StoredFeedback(False, "", (), "ben", datetime.now(UTC))
        assert store.add_feedback("missing", missing) == ("missing", None)
        # a cap per incident: the entry after the cap is refused, nothing is written
        note = StoredFeedback(False, "again", (), "eve", datetime.now(UTC))
        assert store.add_feedback("i-0", note, max_per_incident=2)[0] == "added"
        assert store.add_feedback("i-0", note, max_per_incident=2)[0] == "added"
        assert store.add_feedback("i-0", note, max_per_incident=2) == ("full", None)
        assert len(store.get("i-0").feedback) == 2
        exported = {e["request_id"]: e for e in store.feedback_export()}
        assert exported["i-1"]["expected_sop_ids"] == ["SOP-123"] and len(exported) == 2
    finally:
        store.close()


def test_similar_incidents_come_from_the_whole_history_at_bounded_cost(database_url):
    """An old incident is found behind 250 newer ones on the same equipment (the newest-200 scan this replaced
    missed it), and a word every incident shares is read at most `per_word` deep."""
    from sqlalchemy.orm import Session

    from services.orchestrator.history import IncidentRow, IncidentWordRow

    store = IncidentStore(database_url)
    try:
        store.save(incident("old", problem="Hydraulic press ram drifts down slowly under load", minutes_ago=500)[0])
        newer = [
            incident(f"new-{n}", problem=f"Conveyor belt unit{n:03d} squeals at startup", minutes_ago=400 - n)[0]
            for n in range(250)
        ]
        with Session(store.engine) as session:  # bulk, as save() writes them
            session.add_all([IncidentRow.of(i) for i in newer])
            session.flush()
            session.add_all([row for i in newer for row in IncidentWordRow.of(i)])
            session.commit()
        (found,) = store.similar("PUNE-IN", "CNC-A-102", "press ram drifts under load")
        assert found.request_id == "old" and found.problem_description.startswith("Hydraulic press")
        assert found.created_at.tzinfo is not None
        # "conveyor", "belt", "squeals", "startup" are in all 250: only the newest per_word of each are read, so
        # new-7 (all five words) shares just "unit007" within that depth
        question = "Conveyor belt unit007 squeals at startup"
        shallow = store.similar("PUNE-IN", "CNC-A-102", question, limit=5, per_word=50)
        assert len(shallow) == 5 and all(int(p.request_id.split("-")[1]) >= 200 for p in shallow)
        deep = store.similar("PUNE-IN", "CNC-A-102", question, limit=2, per_word=300)
        assert [p.request_id for p in deep] == ["new-7", "new-249"]  # every word shared, then the newest
        assert store.similar("PUNE-IN", "OTHER-9", "press ram drifts under load") == []
    finally:
        store.close()


async def test_the_orchestrator_runs_on_postgres(postgres_url):
    """The whole edge on a Postgres URL: a diagnosis is stored, replayed on retry, listed and given feedback."""
    from copilot.client import aio_channel, diagnose_request
    from copilot.v1 import copilot_pb2, copilot_pb2_grpc
    from services.orchestrator.server import OrchestratorSettings, build
    from tests.conftest import token
    from tests.contract.conftest import serving
    from tests.fakes import FakeAgents

    settings = OrchestratorSettings(port=0, database_url=postgres_url)
    async with serving(*build(settings, clients=FakeAgents())) as edge:
        async with aio_channel(f"127.0.0.1:{edge.port}", token()) as channel:
            copilot = copilot_pb2_grpc.CopilotServiceStub(channel)
            request = diagnose_request("PUNE-IN", "CNC-PG-1", "Spindle overheating during the shift", request_id="pg-1")
            first = await copilot.Diagnose(request, timeout=10)
            again = await copilot.Diagnose(request, timeout=10)
            assert again.replayed and again.report == first.report
            await copilot.SubmitFeedback(copilot_pb2.SubmitFeedbackRequest(request_id="pg-1", helpful=True), timeout=5)
            listed = await copilot.ListIncidents(copilot_pb2.ListIncidentsRequest(equipment_id="CNC-PG-1"), timeout=5)
            assert [(i.request_id, len(i.feedback)) for i in listed.incidents] == [("pg-1", 1)]


def test_the_migrations_build_exactly_the_tables_the_code_declares(database_url):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.orchestrator.history import Base

    store = IncidentStore(database_url)
    try:
        with store.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []  # a model change needs a new revision
            assert context.get_current_revision() == _head_revision()
    finally:
        store.close()


def test_a_history_created_before_migrations_is_adopted_with_its_incidents(tmp_path):
    from sqlalchemy import create_engine, text
    from sqlalchemy.orm import Session

    from services.orchestrator.history import Base, FeedbackRow, ImageRow, IncidentRow

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    # how the history was created before it had migrations (the baseline's tables)
    Base.metadata.create_all(engine, tables=[ImageRow.__table__, IncidentRow.__table__, FeedbackRow.__table__])
    old, _ = incident("old-1")
    with Session(engine) as session:
        session.add(IncidentRow.of(old))
        session.commit()
    engine.dispose()
    store = IncidentStore(url)
    try:
        assert store.get("old-1").referenced_sop_ids == ("SOP-123",)
        # revision 0002 indexed the words of the incidents already there
        assert [p.request_id for p in store.similar("PUNE-IN", "CNC-A-102", old.problem_description)] == ["old-1"]
        with store.engine.connect() as connection:
            assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == _head_revision()
    finally:
        store.close()


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    from services.orchestrator.history import MIGRATIONS

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def test_the_cluster_form_of_the_database_setting_reaches_postgres(postgres_url, tmp_path, monkeypatch):
    """As the prod overlay configures it: the server's location in libpq's PGHOST / PGPORT (a ConfigMap, where the
    NetworkPolicy test reads it), the URL with the credentials and no host in a mounted Secret file
    (COPILOT_SECRETS_DIR/orchestrator_database_url), never in an environment variable."""
    from urllib.parse import urlsplit

    from services.orchestrator.server import OrchestratorSettings

    location = urlsplit(postgres_url)
    monkeypatch.setenv("PGHOST", location.hostname)
    monkeypatch.setenv("PGPORT", str(location.port))
    monkeypatch.delenv("ORCHESTRATOR_DATABASE_URL", raising=False)
    (tmp_path / "orchestrator_database_url").write_text(f"postgresql+psycopg://{location.username}@{location.path}\n")
    monkeypatch.setenv("COPILOT_SECRETS_DIR", str(tmp_path))
    url = OrchestratorSettings().database_url
    assert url == f"postgresql+psycopg://{location.username}@/postgres"
    store = IncidentStore(url)
    try:
        store.save(*incident("pg-hostless", equipment="PGHOST-1"))
        assert store.get("pg-hostless").equipment_id == "PGHOST-1"
    finally:
        store.close()


def test_a_reader_never_creates_or_upgrades_the_history_and_says_why_it_refuses(tmp_path):
    """`copilot eval --export-feedback` opens the history read-only: a missing file is not created, a history at
    another schema revision is refused (with both revisions named) and left as it was; at this release's revision
    it reads."""
    from alembic import command
    from sqlalchemy import create_engine, text

    from services.orchestrator.history import SchemaMismatch, head_revision, migrations_config

    missing = tmp_path / "none.db"
    with pytest.raises(SchemaMismatch, match="no incident history"):
        IncidentStore(f"sqlite:///{missing}", migrate=False)
    assert not missing.exists()

    url = f"sqlite:///{tmp_path / 'older.db'}"
    IncidentStore(url).close()  # the orchestrator made it, at head
    engine = create_engine(url)
    with engine.begin() as connection:
        command.downgrade(migrations_config(connection), "0002")  # as a previous release left it
    with pytest.raises(SchemaMismatch, match=f"revision 0002, this release reads {head_revision()}"):
        IncidentStore(url, migrate=False)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"  # untouched
    engine.dispose()

    store = IncidentStore(url)  # the orchestrator upgrades it
    store.save(*incident("ro-1"))
    store.close()
    reader = IncidentStore(url, migrate=False)
    try:
        assert reader.get("ro-1") is not None and reader.feedback_export() == []
    finally:
        reader.close()
