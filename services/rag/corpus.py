"""SOP documents: Markdown with a YAML front matter, chunked by section heading."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

_FRONT_MATTER = re.compile(r"^---\n(.*?)\n---\n", re.S)
_HEADING = re.compile(r"^(#{1,3})\s+(.*)$", re.M)
_STEP = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.*\S)\s*$")


def step_lines(text: str) -> list[str]:
    """Numbered or bulleted lines of a text, in order."""
    return [m.group(1) for line in text.splitlines() if (m := _STEP.match(line))]


@dataclass(frozen=True)
class Section:
    heading: str
    body: str
    position: int

    def steps(self) -> list[str]:
        """Numbered or bulleted lines of the section, in document order."""
        return step_lines(self.body)


@dataclass(frozen=True)
class SopDocument:
    sop_id: str
    title: str
    version: str
    sections: tuple[Section, ...]
    equipment_types: tuple[str, ...] = field(default=())
    source: str = ""

    @property
    def content_hash(self) -> str:
        text = "\n".join(f"{s.heading}\n{s.body}" for s in self.sections)
        return hashlib.sha256(f"{self.sop_id}|{self.version}|{self.title}|{text}".encode()).hexdigest()[:16]


def parse_markdown(text: str, source: str = "") -> SopDocument:
    match = _FRONT_MATTER.match(text)
    if not match:
        raise ValueError(f"{source or 'document'}: missing front matter (--- id/title/version ---)")
    meta = yaml.safe_load(match.group(1)) or {}
    for key in ("id", "title", "version"):
        if not meta.get(key):
            raise ValueError(f"{source or 'document'}: front matter lacks '{key}'")
    body = text[match.end():]
    headings = list(_HEADING.finditer(body))
    sections: list[Section] = []
    for index, heading in enumerate(headings):
        if len(heading.group(1)) == 1:  # the document title
            continue
        end = headings[index + 1].start() if index + 1 < len(headings) else len(body)
        content = body[heading.end():end].strip()
        if content:
            sections.append(Section(heading.group(2).strip(), content, len(sections)))
    if not sections:
        raise ValueError(f"{source or 'document'}: no '## ' sections")
    return SopDocument(
        sop_id=str(meta["id"]),
        title=str(meta["title"]),
        version=str(meta["version"]),
        sections=tuple(sections),
        equipment_types=tuple(meta.get("equipment_types") or ()),
        source=source,
    )


def starter_corpus() -> list[SopDocument]:
    """The seed's five SOPs, shipped with the package."""
    folder = resources.files("services.rag") / "corpus"
    return [parse_markdown(p.read_text(encoding="utf-8"), p.name) for p in sorted(folder.iterdir(), key=lambda p: p.name)
            if p.name.endswith(".md")]


def load_folder(path: Path) -> list[SopDocument]:
    return [parse_markdown(p.read_text(encoding="utf-8"), str(p)) for p in sorted(path.glob("*.md"))]
