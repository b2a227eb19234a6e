"""Reference images per equipment type, persisted on disk so a restart keeps them.

Layout: <root>/index.json (metadata) and <root>/images/<sha256>.<ext>. The index is rewritten atomically
(temporary file + rename), so a crash never leaves half an index. An empty store is seeded from the
shipped starter set.

Several vision processes may share one root (replicas on one host, or pods on a ReadWriteMany volume): writes
take an exclusive `flock` on <root>/.lock and merge the index as it is on disk, and `refresh()` picks up what
other processes wrote (the vision service calls it every VISION_REFERENCE_SYNC_S). Seeding is one write under
that lock, so replicas starting together on a fresh store see it empty or whole."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from copilot.domain import utc_now
from copilot.images import sniff_mime_type

LABEL = re.compile(r"[a-z][a-z0-9-]{1,39}")
EQUIPMENT_TYPE = re.compile(r"[a-z][a-z0-9-]{1,39}")
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


class ReferenceIndexCorrupt(RuntimeError):
    """The index on disk cannot be read: the store will not guess which references exist."""


@dataclass(frozen=True)
class Reference:
    """A registered reference image: good part or labelled defect of one equipment type."""

    reference_id: str
    equipment_type: str
    label: str
    sha256: str
    width: int
    height: int
    created_at: str  # ISO 8601, UTC
    file: str

    @property
    def good(self) -> bool:
        return self.label == "good"


class ReferenceStore:
    """The reference images on disk with their index, shared by the vision replicas."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.index_path = root / "index.json"
        self._lock = threading.RLock()
        self.images.mkdir(parents=True, exist_ok=True)
        self._lock_path = root / ".lock"
        self._refs: dict[str, Reference] = {}
        self._stamp: tuple[int, int, int] | None = None  # the index file as last read: (inode, size, mtime_ns)
        self.refresh()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """This process's threads and every other process on the root, one writer at a time."""
        with self._lock, open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _index_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.index_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def refresh(self) -> set[str]:
        """Re-read the index if another process changed it; returns the equipment types whose references
        changed (empty when nothing did)."""
        with self._lock:
            return self._reread()

    def _reread(self) -> set[str]:
        stamp = self._index_stamp()
        if stamp == self._stamp:
            return set()
        refs: dict[str, Reference] = {}
        if stamp is not None:
            try:  # replaced atomically by writers: anything unreadable was damaged from outside
                for item in json.loads(self.index_path.read_text()):
                    ref = Reference(**item)
                    refs[ref.reference_id] = ref
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                raise ReferenceIndexCorrupt(
                    f"{self.index_path} is not a readable reference index ({type(exc).__name__}: {exc}); refusing to "
                    "serve without it: restore it from a backup, or move the folder away to start again from the "
                    "starter set"
                ) from exc
        before, after = set(self._refs.values()), set(refs.values())
        self._refs, self._stamp = refs, stamp
        return {r.equipment_type for r in before ^ after}

    def __len__(self) -> int:
        return len(self._refs)

    def all(self) -> list[Reference]:
        return sorted(self._refs.values(), key=lambda r: (r.equipment_type, r.label, r.created_at, r.reference_id))

    def get(self, reference_id: str) -> Reference | None:
        return self._refs.get(reference_id)

    def path(self, ref: Reference) -> Path:
        return self.images / ref.file

    def read(self, ref: Reference) -> bytes:
        return self.path(ref).read_bytes()

    def _write_index(self) -> None:
        tmp = self.index_path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps([asdict(r) for r in self.all()], indent=1))
        os.replace(tmp, self.index_path)
        self._stamp = self._index_stamp()

    def add(self, equipment_type: str, label: str, data: bytes, width: int, height: int) -> tuple[Reference, bool]:
        """Store an image; the same bytes with the same type and label return the existing reference."""
        with self._exclusive():
            self.refresh()  # what other processes added meanwhile
            ref, created = self._put(equipment_type, label, data, width, height)
            if created:
                self._write_index()
            return ref, created

    def seed(self, images: Iterable[tuple[str, str, bytes, int, int]]) -> int:
        """Add (equipment_type, label, data, width, height) images in one index write, only if the store is empty
        as it is on disk: replicas starting together on one fresh store seed it once, and none of them ever reads
        a half-seeded set (each would build models of it, then rebuild them all when it saw the rest). Returns
        how many were added (0: the store already held references)."""
        with self._exclusive():
            self.refresh()
            if self._refs:
                return 0
            try:
                added = sum(self._put(*image)[1] for image in images)
            except BaseException:  # nothing was written to the index: neither is anything kept in memory
                self._refs.clear()
                raise
            if added:
                self._write_index()
            return added

    def _put(self, equipment_type: str, label: str, data: bytes, width: int, height: int) -> tuple[Reference, bool]:
        """Under the exclusive lock: the image file and the in-memory entry (the caller writes the index)."""
        digest = hashlib.sha256(data).hexdigest()
        for ref in self._refs.values():
            if (ref.sha256, ref.equipment_type, ref.label) == (digest, equipment_type, label):
                return ref, False
        file = f"{digest}.{_EXT[sniff_mime_type(data) or 'image/png']}"
        target = self.images / file
        if not target.exists():
            tmp = target.with_suffix(".part")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        ref = Reference(
            reference_id=f"ref-{uuid.uuid4().hex[:12]}",
            equipment_type=equipment_type,
            label=label,
            sha256=digest,
            width=width,
            height=height,
            created_at=utc_now().isoformat(),
            file=file,
        )
        self._refs[ref.reference_id] = ref
        return ref, True

    def delete(self, reference_id: str) -> Reference | None:
        with self._exclusive():
            self.refresh()
            ref = self._refs.pop(reference_id, None)
            if ref is None:
                return None
            self._write_index()
            if not any(r.file == ref.file for r in self._refs.values()):
                self.path(ref).unlink(missing_ok=True)
            return ref
