"""Reference images per equipment type, persisted on disk so a restart keeps them.

Layout: <root>/index.json (metadata) and <root>/images/<sha256>.<ext>. The index is rewritten atomically
(temporary file + rename), so a crash never leaves half an index. An empty store is seeded from the
shipped starter set."""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from copilot.images import sniff_mime_type

LABEL = re.compile(r"[a-z][a-z0-9-]{1,39}")
EQUIPMENT_TYPE = re.compile(r"[a-z][a-z0-9-]{1,39}")
_EXT = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}


@dataclass(frozen=True)
class Reference:
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
    def __init__(self, root: Path) -> None:
        self.root = root
        self.images = root / "images"
        self.index_path = root / "index.json"
        self._lock = threading.Lock()
        self.images.mkdir(parents=True, exist_ok=True)
        self._refs: dict[str, Reference] = {}
        if self.index_path.exists():
            for item in json.loads(self.index_path.read_text()):
                ref = Reference(**item)
                self._refs[ref.reference_id] = ref

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
        tmp = self.index_path.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in self.all()], indent=1))
        os.replace(tmp, self.index_path)

    def add(self, equipment_type: str, label: str, data: bytes, width: int, height: int) -> tuple[Reference, bool]:
        """Store an image; the same bytes with the same type and label return the existing reference."""
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            for ref in self._refs.values():
                if (ref.sha256, ref.equipment_type, ref.label) == (digest, equipment_type, label):
                    return ref, False
            file = f"{digest}.{_EXT[sniff_mime_type(data) or 'image/png']}"
            target = self.images / file
            if not target.exists():
                tmp = target.with_suffix(".part")
                tmp.write_bytes(data)
                os.replace(tmp, target)
            ref = Reference(reference_id=f"ref-{uuid.uuid4().hex[:12]}", equipment_type=equipment_type, label=label,
                            sha256=digest, width=width, height=height,
                            created_at=datetime.now(timezone.utc).isoformat(), file=file)
            self._refs[ref.reference_id] = ref
            self._write_index()
            return ref, True

    def delete(self, reference_id: str) -> Reference | None:
        with self._lock:
            ref = self._refs.pop(reference_id, None)
            if ref is None:
                return None
            self._write_index()
            if not any(r.file == ref.file for r in self._refs.values()):
                self.path(ref).unlink(missing_ok=True)
            return ref
