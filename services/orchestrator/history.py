"""Incident history: every diagnosis is persisted with its inputs, outputs, stage statuses, principal and trace
id (SQLAlchemy; SQLite file by default, a Postgres URL works the same). Images are stored once per SHA-256 in
their own table, never inline in the incident. Blocking calls: the servicer runs them in a thread.

The tables are declared once, below; their schema evolves through the Alembic revisions in `migrations/`
(applied at start by `migrate`; a change to a table here comes with a new revision, which a test checks)."""

from __future__ import annotations

import builtins
import functools
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.sql.selectable import TextualSelect

from copilot.domain import PastIncident, as_utc

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
from copilot.text import content_words


class Base(DeclarativeBase):
    """The incident history's SQLAlchemy declarative base."""


class ImageRow(Base):
    """A diagnosed photo, stored once per content (sha256), shared by the incidents that sent it."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    mime_type: Mapped[str] = mapped_column(String(32))
    size_bytes: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class IncidentRow(Base):
    """One answered diagnosis: who asked what about which machine, and the answer as sent."""

    __tablename__ = "incidents"
    __table_args__ = (
        Index("ix_incidents_equipment_created", "plant_id", "equipment_id", "created_at"),
        Index("ix_incidents_created", "created_at", "request_id"),
    )

    request_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    plant_id: Mapped[str] = mapped_column(String(16))
    equipment_id: Mapped[str] = mapped_column(String(64))
    equipment_type: Mapped[str] = mapped_column(String(40), default="")
    problem_description: Mapped[str] = mapped_column(Text)
    image_sha256: Mapped[str | None] = mapped_column(ForeignKey("images.sha256"), nullable=True)
    image_mime_type: Mapped[str] = mapped_column(String(32), default="")
    # Fingerprint of the request: a retry with the same request_id must carry the same request.
    input_fingerprint: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str] = mapped_column(String(128))
    trace_id: Mapped[str] = mapped_column(String(32), default="")
    confidence: Mapped[float] = mapped_column(Float)
    requires_manual_review: Mapped[bool] = mapped_column(Boolean)
    referenced_sop_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    stages: Mapped[list[dict[str, str]]] = mapped_column(
        JSON, default=list
    )  # [{"stage", "state", "error"}] for queries/dashboards
    # The DiagnoseResponse exactly as answered (serialized protobuf), replayed for idempotent retries.
    response: Mapped[bytes] = mapped_column(LargeBinary)

    @classmethod
    def of(cls, incident: StoredIncident) -> IncidentRow:
        return cls(**cls.values(incident))

    @staticmethod
    def values(incident: StoredIncident) -> dict[str, Any]:
        """The row's columns (for a Core insert: the ORM's unit of work costs more than the insert itself)."""
        return dict(
            request_id=incident.request_id,
            created_at=incident.created_at,
            plant_id=incident.plant_id,
            equipment_id=incident.equipment_id,
            equipment_type=incident.equipment_type,
            problem_description=incident.problem_description,
            image_sha256=incident.image_sha256 or None,
            image_mime_type=incident.image_mime_type,
            input_fingerprint=incident.input_fingerprint,
            principal=incident.principal,
            trace_id=incident.trace_id,
            confidence=incident.confidence,
            requires_manual_review=incident.requires_manual_review,
            referenced_sop_ids=list(incident.referenced_sop_ids),
            stages=list(incident.stages),
            response=incident.response,
        )


#: A word longer than this is indexed cut to this length (the column's width).
WORD_LENGTH = 64


class IncidentWordRow(Base):
    """The similar-incident index: one row per content word of an incident's problem description, written with the
    incident. `words` is how many distinct content words the description has (for the Jaccard overlap without
    reading the incident). The primary key serves the lookup: newest postings of a word on one equipment."""

    __tablename__ = "incident_words"

    plant_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    equipment_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    word: Mapped[str] = mapped_column(String(WORD_LENGTH), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("incidents.request_id"), primary_key=True)
    words: Mapped[int] = mapped_column(Integer)

    @classmethod
    def of(cls, incident: StoredIncident) -> builtins.list[IncidentWordRow]:
        return [cls(**values) for values in cls.values(incident)]

    @staticmethod
    def values(incident: StoredIncident) -> builtins.list[dict[str, Any]]:
        words = indexed_words(incident.problem_description)
        return [
            dict(
                plant_id=incident.plant_id,
                equipment_id=incident.equipment_id,
                word=word,
                created_at=incident.created_at,
                request_id=incident.request_id,
                words=len(words),
            )
            for word in sorted(words)
        ]


def indexed_words(text: str) -> frozenset[str]:
    """The content words of a description as the index holds them."""
    return frozenset(w[:WORD_LENGTH] for w in content_words(text))


class FeedbackRow(Base):
    """A technician's verdict on an incident's answer (idempotent per feedback_id)."""

    __tablename__ = "feedback"
    __table_args__ = (Index("ux_feedback_request_feedback_id", "request_id", "feedback_id", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("incidents.request_id"), index=True)
    helpful: Mapped[bool] = mapped_column(Boolean)
    resolution_notes: Mapped[str] = mapped_column(Text, default="")
    helpful_sop_ids: Mapped[list[str]] = mapped_column(JSON, default=list)
    principal: Mapped[str] = mapped_column(String(128))
    submitted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # the caller's idempotency key (NULL: none; NULLs never collide in the unique index) and the three-state
    # verdict (NULL for entries stored before revision 0003: read from `helpful`)
    feedback_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    verdict: Mapped[str | None] = mapped_column(String(16), nullable=True)


#: The verdicts a feedback entry can hold.
VERDICTS = ("helpful", "not_helpful", "unspecified")


@dataclass(frozen=True)
class StoredFeedback:
    """A feedback entry as the history returns it."""

    helpful: bool
    resolution_notes: str
    helpful_sop_ids: tuple[str, ...]
    principal: str
    submitted_at: datetime
    verdict: str = ""  # one of VERDICTS; "" (entries before revision 0003): helpful / not_helpful from `helpful`
    feedback_id: str = ""

    @property
    def said(self) -> str:
        """The verdict, for entries of every revision."""
        return self.verdict or ("helpful" if self.helpful else "not_helpful")

    def same_content(self, other: StoredFeedback) -> bool:
        """What a retry with the same feedback_id must repeat (not the time it was sent)."""
        return (self.said, self.resolution_notes, self.helpful_sop_ids, self.principal) == (
            other.said,
            other.resolution_notes,
            other.helpful_sop_ids,
            other.principal,
        )


@dataclass(frozen=True)
class StoredIncident:
    """An incident as the history stores and returns it (the answer as serialized bytes)."""

    request_id: str
    created_at: datetime
    plant_id: str
    equipment_id: str
    equipment_type: str
    problem_description: str
    image_sha256: str
    image_mime_type: str
    principal: str
    trace_id: str
    confidence: float
    requires_manual_review: bool
    referenced_sop_ids: tuple[str, ...]
    response: bytes
    input_fingerprint: str = ""
    stages: tuple[dict[str, str], ...] = ()  # {"stage", "state", "error"}: queryable without decoding the response
    feedback: tuple[StoredFeedback, ...] = field(default=())


class RequestIdConflict(Exception):
    """The request id is already used by a different request."""


MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE_REVISION = "0001"


def migrations_config(connection: Connection | None) -> AlembicConfig:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade_schema(engine: Engine) -> None:
    """Bring the schema to the newest revision. A database created before the history had migrations (its
    tables, no alembic_version) has the baseline's schema: it is stamped at the baseline, then upgraded."""
    from alembic import command

    with engine.begin() as connection:
        config = migrations_config(connection)
        tables = set(inspect(connection).get_table_names())
        if "incidents" in tables and "alembic_version" not in tables:
            command.stamp(config, BASELINE_REVISION)
        command.upgrade(config, "head")


@functools.lru_cache(maxsize=64)
def _similar_statement(n_asked: int, per_word: int, limit: int) -> TextualSelect:
    """The similar-incident lookup as one statement (one per number of asked words, plain SQL that SQLite and
    PostgreSQL both run, so nothing is compiled per call): for each word `:w0` … its newest `per_word` postings on
    the equipment (an index range scan each); per incident the words it shares and the Jaccard overlap with the
    `:n_words` of the description; the best `limit` at >= 0.2 (ties: newest first) with their problem, SOPs and
    newest resolution notes. Only those rows leave the database."""
    postings = "\n    UNION ALL\n    ".join(
        f"SELECT request_id, words FROM (SELECT request_id, words FROM incident_words "
        f"WHERE plant_id = :plant_id AND equipment_id = :equipment_id AND word = :w{i} "
        f"ORDER BY created_at DESC LIMIT {int(per_word)}) AS p{i}"
        for i in range(n_asked)
    )
    sql = f"""
WITH postings AS (
    {postings}
), scored AS (
    SELECT request_id, CAST(COUNT(*) AS FLOAT) / (:n_words + MAX(words) - COUNT(*)) AS overlap
    FROM postings WHERE request_id <> :exclude GROUP BY request_id
)
SELECT s.request_id, i.created_at, i.problem_description, i.referenced_sop_ids,
    (SELECT f.resolution_notes FROM feedback AS f
     WHERE f.request_id = s.request_id AND f.resolution_notes <> ''
     ORDER BY f.submitted_at DESC, f.id DESC LIMIT 1) AS resolution_notes
FROM scored AS s JOIN incidents AS i ON i.request_id = s.request_id
WHERE s.overlap >= 0.2
ORDER BY s.overlap DESC, i.created_at DESC, s.request_id
LIMIT {int(limit)}"""
    return text(sql).columns(
        request_id=String,
        created_at=DateTime(timezone=True),
        problem_description=Text,
        referenced_sop_ids=JSON,
        resolution_notes=Text,
    )


class SchemaMismatch(Exception):
    """A read-only store found a history this release cannot read without upgrading it (which only the
    orchestrator does)."""


def schema_revision(engine: Engine) -> str | None:
    """The history's migration revision; None for a database without one (empty, or older than migrations)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        revision: str | None = MigrationContext.configure(connection).get_current_revision()
        return revision


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    config = migrations_config(None)  # the script directory needs no connection
    head = ScriptDirectory.from_config(config).get_current_head()
    assert head is not None
    return head


class IncidentStore:
    """The incident history. The orchestrator opens it read-write: the schema is migrated to this release's
    revision first. A reader (`copilot export-feedback`) opens it with `migrate=False`: nothing is created or
    upgraded, and a history at another revision (or none) is refused with SchemaMismatch."""

    def __init__(self, url: str, *, migrate: bool = True) -> None:
        if not migrate:
            if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
                raise SchemaMismatch(
                    f"no incident history at {url}: nothing was read or written. A local mesh keeps it in "
                    "<data dir>/incidents.db (--data-dir, COPILOT_DATA_DIR); another database: --database-url"
                )
        elif url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        # a pooled PostgreSQL connection may have been closed by the server: check it on checkout (SQLite's
        # connections are files, never dropped)
        self.engine = create_engine(url, pool_pre_ping=not url.startswith("sqlite"))
        if self.engine.dialect.name == "sqlite":

            @event.listens_for(self.engine, "connect")
            def _pragmas(connection: Any, _record: Any) -> None:  # concurrent readers while one writer commits
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA synchronous=NORMAL")  # WAL: a crash of the process loses nothing committed
                cursor.execute("PRAGMA busy_timeout=5000")
                cursor.execute("PRAGMA foreign_keys=ON")
                cursor.close()

        if not migrate:
            found, wanted = schema_revision(self.engine), head_revision()
            if found != wanted:
                self.engine.dispose()
                raise SchemaMismatch(
                    f"the incident history at {self.engine.url.render_as_string(hide_password=True)} is at schema "
                    f"revision {found or 'none'}, this release reads {wanted}: the orchestrator of this release "
                    "upgrades it when it starts (a reader never does)"
                )
        else:
            upgrade_schema(self.engine)
        self._session = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    # --- writes ---------------------------------------------------------------------------------

    def save(self, incident: StoredIncident, image: bytes = b"") -> StoredIncident:
        """Insert the incident and its word-index rows in one transaction (the image first, once per hash). A
        second save under the same request id returns the stored incident when the request is the same, else
        raises RequestIdConflict."""
        if image:
            self._save_image(incident, image)
        words = IncidentWordRow.values(incident)
        try:
            with self.engine.begin() as connection:
                connection.execute(insert(IncidentRow), IncidentRow.values(incident))
                if words:
                    connection.execute(insert(IncidentWordRow), words)
        except IntegrityError:
            existing = self.get(incident.request_id)
            if existing is None:
                raise
            if existing.input_fingerprint != incident.input_fingerprint:
                raise RequestIdConflict(incident.request_id) from None
            return existing
        return incident

    def _save_image(self, incident: StoredIncident, image: bytes) -> None:
        """Content-addressed: stored once, committed on its own (an image whose incident then fails to store is
        kept; it is the same bytes whoever sends them again)."""
        with self._session() as session:
            stored = session.get(ImageRow, incident.image_sha256)
            if stored is not None:
                if not stored.data:  # its bytes were past retention: the new incident brings them back
                    stored.data = image
                    session.commit()
                return
            session.add(
                ImageRow(
                    sha256=incident.image_sha256, mime_type=incident.image_mime_type, size_bytes=len(image), data=image
                )
            )
            try:
                session.commit()
            except IntegrityError:  # stored by a concurrent request meanwhile: fine, it is the same bytes
                session.rollback()

    def add_feedback(
        self, request_id: str, feedback: StoredFeedback, max_per_incident: int = 0
    ) -> tuple[str, StoredFeedback | None]:
        """("added", it), ("replayed", the stored entry: same feedback_id and content), ("conflict", the stored
        entry: same feedback_id, other content), ("missing", None: no such incident) or ("full", None: it has
        `max_per_incident` entries already; 0: no cap). Exact under concurrency: the transaction first writes the
        incident's row (an UPDATE that changes nothing), so it holds that row's lock (PostgreSQL) or the database's
        write lock (SQLite) through the lookup, the count and the insert; concurrent writers, on any replica, take
        turns (a burst of 200 concurrent calls once stored 21 entries under a cap of 20)."""
        with self._session() as session:
            touched = session.execute(
                update(IncidentRow)
                .where(IncidentRow.request_id == request_id)
                .values(request_id=IncidentRow.request_id)
            )
            if not touched.rowcount:  # type: ignore[attr-defined]  # a CursorResult for an UPDATE
                return "missing", None
            if feedback.feedback_id:
                stored = session.scalar(
                    select(FeedbackRow).where(
                        FeedbackRow.request_id == request_id, FeedbackRow.feedback_id == feedback.feedback_id
                    )
                )
                if stored is not None:
                    before = self._feedback(stored)
                    return ("replayed" if before.same_content(feedback) else "conflict"), before
            if max_per_incident:
                count = session.scalar(
                    select(func.count()).select_from(FeedbackRow).where(FeedbackRow.request_id == request_id)
                )
                if (count or 0) >= max_per_incident:
                    return "full", None
            session.add(
                FeedbackRow(
                    request_id=request_id,
                    helpful=feedback.said == "helpful",
                    resolution_notes=feedback.resolution_notes,
                    helpful_sop_ids=list(feedback.helpful_sop_ids),
                    principal=feedback.principal,
                    submitted_at=feedback.submitted_at,
                    feedback_id=feedback.feedback_id or None,
                    verdict=feedback.said,
                )
            )
            session.commit()
            return "added", feedback

    # --- reads ----------------------------------------------------------------------------------

    @staticmethod
    def _feedback(row: FeedbackRow) -> StoredFeedback:
        return StoredFeedback(
            row.helpful,
            row.resolution_notes,
            tuple(row.helpful_sop_ids),
            row.principal,
            as_utc(row.submitted_at),
            verdict=row.verdict or "",
            feedback_id=row.feedback_id or "",
        )

    def _incident(self, row: IncidentRow, feedback: list[FeedbackRow]) -> StoredIncident:
        return StoredIncident(
            request_id=row.request_id,
            created_at=as_utc(row.created_at),
            plant_id=row.plant_id,
            equipment_id=row.equipment_id,
            equipment_type=row.equipment_type,
            problem_description=row.problem_description,
            image_sha256=row.image_sha256 or "",
            image_mime_type=row.image_mime_type,
            principal=row.principal,
            trace_id=row.trace_id,
            confidence=row.confidence,
            requires_manual_review=row.requires_manual_review,
            referenced_sop_ids=tuple(row.referenced_sop_ids),
            response=row.response,
            input_fingerprint=row.input_fingerprint,
            stages=tuple(row.stages or ()),
            feedback=tuple(self._feedback(f) for f in feedback),
        )

    def _feedback_of(self, session: Session, request_ids: list[str]) -> dict[str, list[FeedbackRow]]:
        found: dict[str, list[FeedbackRow]] = {r: [] for r in request_ids}
        if request_ids:
            rows = session.scalars(
                select(FeedbackRow)
                .where(FeedbackRow.request_id.in_(request_ids))
                .order_by(FeedbackRow.submitted_at, FeedbackRow.id)
            )
            for row in rows:
                found[row.request_id].append(row)
        return found

    def get(self, request_id: str) -> StoredIncident | None:
        with self._session() as session:
            row = session.get(IncidentRow, request_id)
            if row is None:
                return None
            return self._incident(row, self._feedback_of(session, [request_id])[request_id])

    def image(self, sha256: str) -> bytes | None:
        """The photo's bytes; None when there is none or it is past its retention (see expire_photos)."""
        with self._session() as session:
            row = session.get(ImageRow, sha256)
            return row.data if row is not None and row.data else None

    def expire_photos(self, before: datetime) -> tuple[int, int]:
        """Drop the bytes of every photo whose newest incident is older than `before`: (photos, bytes freed).
        The row stays (its hash, type and size: the incidents that cite it keep their evidence of what was sent);
        a photo sent again later is a new incident, so its bytes are kept. Idempotent: replicas may all run it."""
        newest = (
            select(IncidentRow.image_sha256)
            .where(IncidentRow.image_sha256.is_not(None))
            .group_by(IncidentRow.image_sha256)
            .having(func.max(IncidentRow.created_at) < before)
        )
        expired = select(ImageRow.sha256, ImageRow.size_bytes).where(
            ImageRow.sha256.in_(newest), func.length(ImageRow.data) > 0
        )
        with self.engine.begin() as connection:
            rows = connection.execute(expired).all()
            for start in range(0, len(rows), 500):
                hashes = [r.sha256 for r in rows[start : start + 500]]
                connection.execute(update(ImageRow).where(ImageRow.sha256.in_(hashes)).values(data=b""))
        return len(rows), sum(r.size_bytes for r in rows)

    def list(
        self,
        *,
        plant_id: str = "",
        equipment_id: str = "",
        start: datetime | None = None,
        end: datetime | None = None,
        limit: int = 20,
        after: tuple[datetime, str] | None = None,
    ) -> tuple[list[StoredIncident], tuple[datetime, str] | None]:
        """Newest first; keyset pagination on (created_at, request_id). Returns the page and the key of the
        next page (None on the last page)."""
        query = select(IncidentRow)
        if plant_id:
            query = query.where(IncidentRow.plant_id == plant_id)
        if equipment_id:
            query = query.where(IncidentRow.equipment_id == equipment_id)
        if start is not None:
            query = query.where(IncidentRow.created_at >= start)
        if end is not None:
            query = query.where(IncidentRow.created_at < end)
        if after is not None:
            created, request_id = after
            query = query.where(
                (IncidentRow.created_at < created)
                | ((IncidentRow.created_at == created) & (IncidentRow.request_id < request_id))
            )
        query = query.order_by(IncidentRow.created_at.desc(), IncidentRow.request_id.desc()).limit(limit + 1)
        with self._session() as session:
            rows = list(session.scalars(query))
            more = len(rows) > limit
            rows = rows[:limit]
            feedback = self._feedback_of(session, [r.request_id for r in rows])
            page = [self._incident(r, feedback[r.request_id]) for r in rows]
        following = (page[-1].created_at, page[-1].request_id) if more and page else None
        return page, following

    def similar(
        self,
        plant_id: str,
        equipment_id: str,
        problem_description: str,
        *,
        exclude: str = "",
        limit: int = 3,
        per_word: int = 64,
        max_words: int = 24,
    ) -> builtins.list[PastIncident]:
        """Earlier incidents on the same equipment whose problem shares words with this one (Jaccard >= 0.2),
        most overlap first (ties: newest first). Read through the word index: for each of the description's
        content words (the longest `max_words`), its newest `per_word` incidents on this equipment, so the cost is
        bounded whatever the size of the history, and an old incident is found as long as its words are not each
        in `per_word` newer ones."""
        words = indexed_words(problem_description)
        if not words or limit <= 0:
            return []
        asked = sorted(words, key=lambda w: (-len(w), w))[:max_words]
        params: dict[str, Any] = {f"w{i}": word for i, word in enumerate(asked)}
        params.update(plant_id=plant_id, equipment_id=equipment_id, n_words=len(words), exclude=exclude)
        with self.engine.connect() as connection:
            rows = connection.execute(_similar_statement(len(asked), per_word, limit), params).all()
        return [
            PastIncident(
                row.request_id,
                as_utc(row.created_at),
                row.problem_description,
                tuple(row.referenced_sop_ids or ()),
                row.resolution_notes or "",
            )
            for row in rows
        ]

    def feedback_export(self) -> builtins.list[dict[str, Any]]:
        """Every feedback with its incident's question: labelled data for `copilot eval`."""
        with self._session() as session:
            rows = session.execute(
                select(FeedbackRow, IncidentRow).join(IncidentRow).order_by(FeedbackRow.submitted_at, FeedbackRow.id)
            ).all()
            return [
                {
                    "request_id": inc.request_id,
                    "question": inc.problem_description,
                    "plant_id": inc.plant_id,
                    "equipment_id": inc.equipment_id,
                    "equipment_type": inc.equipment_type,
                    "cited_sop_ids": list(inc.referenced_sop_ids),
                    "helpful": fb.helpful,
                    "verdict": self._feedback(fb).said,
                    "expected_sop_ids": list(fb.helpful_sop_ids),
                    "resolution_notes": fb.resolution_notes,
                    "principal": fb.principal,
                    "submitted_at": as_utc(fb.submitted_at).isoformat(),
                }
                for fb, inc in rows
            ]
