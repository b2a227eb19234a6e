"""Documents: Markdown (optional YAML front matter), plain text, PDF, Word (.docx) and HTML, parsed into sections
and chunked. Word and HTML are turned into Markdown first (mammoth: .docx to HTML; html2text: HTML to Markdown), so
their headings, numbered steps and bullets are read as a Markdown document's are.

Pure functions, no store and no gRPC. Every failure is a `DocumentRejected` naming the field at fault,
so the service can answer INVALID_ARGUMENT with field violations before anything is written.
"""

from __future__ import annotations

import codecs
import enum
import hashlib
import io
import re
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import date
from importlib import resources
from pathlib import Path

import yaml

from copilot.domain import FieldViolation
from copilot.equipment import canonical_scope

_FRONT_MATTER = re.compile(r"^---\r?\n(.*?)\r?\n---\r?\n", re.S)
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
_STEP = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+(.*\S)\s*$")
_STEP_START = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s+")
_TABLE_RULE = re.compile(r"^\|?\s*:?-{3,}:?\s*(?:\|\s*:?-{3,}:?\s*)*\|?$")
DOCUMENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SLUG = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")


class DocumentFormat(enum.Enum):
    """The file formats the knowledge library reads."""

    MARKDOWN = "markdown"
    TEXT = "text"
    PDF = "pdf"
    DOCX = "docx"
    HTML = "html"


EXTENSIONS = {
    ".md": DocumentFormat.MARKDOWN,
    ".markdown": DocumentFormat.MARKDOWN,
    ".txt": DocumentFormat.TEXT,
    ".text": DocumentFormat.TEXT,
    ".pdf": DocumentFormat.PDF,
    ".docx": DocumentFormat.DOCX,
    ".html": DocumentFormat.HTML,
    ".htm": DocumentFormat.HTML,
}


class DocumentRejected(ValueError):
    """The document cannot be loaded; `violations` say which field and why."""

    def __init__(self, violations: Iterable[FieldViolation]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in self.violations))


def _reject(field_name: str, description: str) -> DocumentRejected:
    return DocumentRejected([FieldViolation(field_name, description)])


def document_id_violations(field_name: str, value: str, missing: str = "is required") -> list[FieldViolation]:
    """The one rule for document ids, used by parsing and by every RPC that takes an id."""
    if not value:
        return [FieldViolation(field_name, missing)]
    if not DOCUMENT_ID.match(value):
        return [
            FieldViolation(
                field_name, f"'{value[:80]}' must be letters, digits, '.', '_' or '-' (up to 64, e.g. SOP-123)"
            )
        ]
    return []


def step_lines(text: str) -> list[str]:
    """Numbered or bulleted lines of a text, in order."""
    return [m.group(1) for line in text.splitlines() if (m := _STEP.match(line))]


@dataclass(frozen=True)
class Section:
    """One headed section of a document, in reading order."""

    heading: str
    body: str
    position: int

    def steps(self) -> list[str]:
        return step_lines(self.body)


@dataclass(frozen=True)
class DocumentMeta:
    """What the uploader says about a document; unset fields may be filled from a Markdown front matter."""

    document_id: str = ""
    title: str = ""
    version: str = ""
    equipment_types: tuple[str, ...] = ()
    plant_ids: tuple[str, ...] = ()
    format: DocumentFormat | None = None
    filename: str = ""


@dataclass(frozen=True)
class SopDocument:
    """A parsed document: its identity, scope (machine types, plants) and sections."""

    document_id: str
    title: str
    version: str
    sections: tuple[Section, ...]
    equipment_types: tuple[str, ...] = field(default=())
    plant_ids: tuple[str, ...] = field(default=())  # canonical (`canonical_scope`): what scopes are compared in
    format: DocumentFormat = DocumentFormat.MARKDOWN
    filename: str = ""
    size_bytes: int = 0
    plant_labels: tuple[str, ...] = field(default=())  # the plant ids as the uploader wrote them, for listings

    @property
    def content_hash(self) -> str:
        """Hash of what retrieval sees: id, version, title, scope and section text."""
        text = "\n".join(f"{s.heading}\n{s.body}" for s in self.sections)
        scope = ",".join(self.equipment_types) + "|" + ",".join(self.plant_ids)
        return hashlib.sha256(f"{self.document_id}|{self.version}|{self.title}|{scope}|{text}".encode()).hexdigest()


@dataclass(frozen=True)
class Chunk:
    """A retrievable passage: one section, or a window of a long section (windows overlap by whole steps)."""

    document_id: str
    version: str
    title: str
    section: str
    text: str
    position: int  # order inside the document, from 0

    @property
    def chunk_id(self) -> str:
        return f"{self.document_id}@{self.version}#{self.position}"

    @property
    def embedding_text(self) -> str:
        return embedding_text(self.title, self.section, self.text)


def embedding_text(title: str, section: str, text: str) -> str:
    """What a chunk's vector is made of: its document's title and section heading, then its text."""
    return f"{title} - {section}\n{text}"


# --- parsing --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentLimits:
    """What an uploaded document may cost before it is parsed."""

    max_bytes: int = 20 * 1024 * 1024
    max_sections: int = 2000


def detect_format(meta: DocumentMeta) -> DocumentFormat:
    if meta.format is not None:
        return meta.format
    suffix = Path(meta.filename).suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    raise _reject(
        "metadata.format",
        f"unknown document format for '{meta.filename or '(no filename)'}': set format or use one of "
        + ", ".join(sorted(EXTENSIONS)),
    )


def _decode_text(data: bytes, encoding: str = "utf-8-sig", name: str = "UTF-8") -> str:
    """Uploaded text in `encoding` (UTF-8 unless a document declares another), checked to be text."""
    if b"\x00" in data:
        raise _reject("content", "looks binary (contains NUL bytes): not a text or Markdown document")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise _reject("content", f"is not valid {name} text (byte {exc.start})") from None
    printable = sum(ch.isprintable() or ch in "\n\r\t" for ch in text)
    if text and printable / len(text) < 0.95:
        raise _reject("content", "is mostly unprintable characters: not a text document")
    return text.replace("\r\n", "\n")


def _pdf_text(data: bytes) -> list[str]:
    if not data.startswith(b"%PDF-"):
        raise _reject("content", "is not a PDF (no %PDF- header)")
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, DeprecationError, PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        pages = [page.extract_text() or "" for page in reader.pages]
    except (
        PyPdfError,  # unreadable structure, and pypdf's own limits (a stream declaring more bytes than it has)
        DeprecationError,  # filter names pypdf no longer reads
        DependencyError,  # encryption that needs a package this service does not install
        NotImplementedError,  # a filter pypdf does not implement
        RecursionError,  # objects nested past the interpreter's depth
        zlib.error,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        AttributeError,
    ) as exc:
        raise _reject("content", f"is not a readable PDF: {str(exc) or type(exc).__name__}") from None
    return pages


#: Word's paragraph styles as HTML headings, one level down: the Title style is the document's title (the only
#: level-1 heading, as in a Markdown SOP), Heading 1-4 its sections.
_DOCX_STYLES = "\n".join(
    [
        "p[style-name='Title'] => h1:fresh",
        *(f"p[style-name='Heading {n}'] => h{n + 1}:fresh" for n in range(1, 5)),
    ]
)
#: A .docx is a zip archive: what its parts may unpack to at most, and how many there may be (a zip bomb of a few
#: KB would otherwise unpack to gigabytes in the parser).
_DOCX_MAX_UNPACKED = 200 * 1024 * 1024
_DOCX_MAX_PARTS = 10_000


def _docx_html(data: bytes) -> str:
    """A Word document's body as HTML (mammoth), after its archive's declared sizes were checked."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            parts = archive.infolist()
            if len(parts) > _DOCX_MAX_PARTS:
                raise _reject("content", f"is a Word archive of {len(parts)} parts; the limit is {_DOCX_MAX_PARTS}")
            unpacked = sum(part.file_size for part in parts)
            if unpacked > _DOCX_MAX_UNPACKED:
                raise _reject(
                    "content", f"unpacks to {unpacked} bytes; the limit for a Word document is {_DOCX_MAX_UNPACKED}"
                )
            if "word/document.xml" not in archive.namelist():
                raise _reject("content", "is a zip archive without word/document.xml: not a Word (.docx) document")
    except zipfile.BadZipFile:
        raise _reject("content", "is not a Word (.docx) document (not a zip archive)") from None
    from xml.parsers.expat import ExpatError

    import mammoth

    try:
        return str(mammoth.convert_to_html(io.BytesIO(data), style_map=_DOCX_STYLES).value)
    except (
        ExpatError,  # a part that is not well-formed XML (expat also refuses entity amplification: billion laughs)
        zipfile.BadZipFile,
        zlib.error,
        KeyError,  # a part the document names and the archive lacks
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        RecursionError,
    ) as exc:
        raise _reject("content", f"is not a readable Word document: {str(exc) or type(exc).__name__}") from None


_HTML_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?([A-Za-z0-9_.:-]{1,40})""", re.I)


def _decode_html(data: bytes) -> str:
    """An HTML page's text: in the charset its <meta> declares (an intranet's windows-1252 page), else UTF-8."""
    declared = _HTML_CHARSET.search(data[:4096])
    if declared is None or data.startswith(codecs.BOM_UTF8):
        return _decode_text(data)
    name = declared.group(1).decode("ascii")
    try:
        codec = codecs.lookup(name).name
    except LookupError:
        raise _reject("content", f"declares a charset this service does not know: {name!r}") from None
    if codec == "utf-8":
        return _decode_text(data)
    return _decode_text(data, codec, f"{name} (the charset it declares)")


def _html_markdown(html: str) -> str:
    """HTML as Markdown (html2text): headings, lists and tables kept; links' targets, images, scripts and styles
    left out; lines not wrapped."""
    import html2text

    converter = html2text.HTML2Text()
    converter.body_width = 0
    converter.ignore_links = True
    converter.ignore_images = True
    converter.ignore_emphasis = True
    converter.unicode_snob = True
    try:
        markdown = str(converter.handle(html))
    except (ValueError, AssertionError, RecursionError) as exc:
        raise _reject("content", f"is not readable HTML: {str(exc) or type(exc).__name__}") from None
    # list items come indented and table rows with a rule under their first: plain lines read better in a chunk
    lines = (line.strip() for line in markdown.splitlines())
    return "\n".join(line for line in lines if not _TABLE_RULE.match(line))


def _looks_like_heading(line: str, next_line: str) -> bool:
    """Plain text: a short line without final punctuation, followed by text, is a heading."""
    stripped = line.strip()
    if not stripped or len(stripped) > 70 or _STEP_START.match(line) or stripped[-1] in ".,;!?":
        return False
    if stripped.endswith(":"):
        return True
    return stripped.isupper() or (bool(next_line.strip()) and stripped[0].isupper() and len(stripped.split()) <= 8)


def _plain_title(text: str) -> str:
    """A first line that is a heading with nothing under it before the next heading is the title."""
    sections = _plain_sections(text)
    first = next((line.strip().rstrip(":").strip() for line in text.splitlines() if line.strip()), "")
    if first and all(first != heading for heading, _ in sections) and len(first) <= 120 and first[-1] not in ".,;!?":
        return first
    return ""


def _plain_sections(text: str) -> list[tuple[str, str]]:
    lines = text.splitlines()
    sections: list[tuple[str, list[str]]] = []
    heading, body = "Overview", list[str]()
    for index, line in enumerate(lines):
        following = lines[index + 1] if index + 1 < len(lines) else ""
        previous_blank = index == 0 or not lines[index - 1].strip()
        if previous_blank and _looks_like_heading(line, following):
            if any(b.strip() for b in body):
                sections.append((heading, body))
            heading, body = line.strip().rstrip(":").strip(), []
        else:
            body.append(line)
    if any(b.strip() for b in body):
        sections.append((heading, body))
    return [(h, "\n".join(b).strip()) for h, b in sections]


def _markdown_sections(body: str) -> tuple[str, list[tuple[str, str]]]:
    """(title from the '# ' heading, [(heading, text)]) of a Markdown body."""
    headings = list(_MD_HEADING.finditer(body))
    title = ""
    found: list[tuple[str, str]] = []
    preamble = body[: headings[0].start()].strip() if headings else body.strip()
    if preamble:
        found.append(("Overview", preamble))
    for index, heading in enumerate(headings):
        end = headings[index + 1].start() if index + 1 < len(headings) else len(body)
        content = body[heading.end() : end].strip()
        if len(heading.group(1)) == 1 and not title:
            title = heading.group(2).strip()
            if content:
                found.append(("Overview", content))
            continue
        if content:
            found.append((heading.group(2).strip(), content))
    return title, found


#: What a front matter field may hold: one plain value (a list field: a flat list of them). YAML aliases can make a
#: value a structure whose text is exponentially long: a 1 KB "billion laughs" front matter kept the parser busy
#: past 10 s and gigabytes when its title or scope was turned into text.
_SCALARS = (str, int, float, date)


def _front_text(front: dict[str, object], key: str) -> str:
    value = front.get(key)
    if value is None or value == "":
        return ""
    if not isinstance(value, _SCALARS):
        raise _reject("content", f"front matter '{key}' must be a single value, not a list or mapping")
    return str(value)


def _scope_items(values: object, field_name: str) -> list[str]:
    if values is None or values == "":
        return []
    if isinstance(values, str):
        items: Iterable[object] = [v.strip() for v in values.split(",")]
    elif isinstance(values, list | tuple) and all(isinstance(v, _SCALARS) for v in values):
        items = values
    else:
        raise _reject(field_name, "must be a list of names or a comma-separated string")
    return [str(v).strip() for v in items if str(v).strip() and canonical_scope(str(v)) not in {"all", "*"}]


def _scope_labels(values: object, field_name: str) -> tuple[str, ...]:
    """The scope values as written (one per canonical value, first spelling kept)."""
    labels: dict[str, str] = {}
    for item in _scope_items(values, field_name):
        labels.setdefault(canonical_scope(item), item)
    return tuple(labels[k] for k in sorted(labels))


def _clean_list(values: object, field_name: str) -> tuple[str, ...]:
    """Scope values in the one form they are compared in (`copilot.equipment.canonical_scope`): ingest, queries
    and listings all use it, so "PUNE-IN" at ingest and "PUNE-IN" or "pune-in" at query time are one plant."""
    cleaned = tuple(sorted({canonical_scope(v) for v in _scope_items(values, field_name)}))
    for value in cleaned:
        if not _SLUG.match(value):
            raise _reject(field_name, f"'{value}' must be kebab-case letters, digits and '-' (up to 64)")
    return cleaned


def parse_document(data: bytes, meta: DocumentMeta, limits: DocumentLimits | None = None) -> SopDocument:
    """Parse uploaded bytes into a document; the request's metadata wins over a Markdown front matter."""
    limits = limits or DocumentLimits()
    if not data:
        raise _reject("content", "is empty")
    if len(data) > limits.max_bytes:
        raise _reject("content", f"is {len(data)} bytes; the limit is {limits.max_bytes}")
    fmt = detect_format(meta)
    front: dict[str, object] = {}
    title_guess = ""
    if fmt is DocumentFormat.PDF:
        pages = _pdf_text(data)
        raw = [
            (h if h != "Overview" else f"Page {n}", b)
            for n, page in enumerate(pages, 1)
            for h, b in _plain_sections(page)
        ]
        title_guess = _plain_title(pages[0]) if pages else ""
    elif fmt is DocumentFormat.DOCX:
        title_guess, raw = _markdown_sections(_html_markdown(_docx_html(data)))
    elif fmt is DocumentFormat.HTML:
        title_guess, raw = _markdown_sections(_html_markdown(_decode_html(data)))
    else:
        text = _decode_text(data)
        if fmt is DocumentFormat.MARKDOWN:
            match = _FRONT_MATTER.match(text)
            if match:
                try:
                    front = yaml.safe_load(match.group(1)) or {}
                except yaml.YAMLError as exc:
                    raise _reject("content", f"front matter is not valid YAML: {exc}") from None
                except RecursionError:  # PyYAML composes nested collections recursively
                    raise _reject("content", "front matter is nested too deeply") from None
                if not isinstance(front, dict):
                    raise _reject("content", "front matter must be a mapping (id, title, version, ...)")
                text = text[match.end() :]
            title_guess, raw = _markdown_sections(text)
        else:
            raw = _plain_sections(text)
            title_guess = _plain_title(text)
    if not any(body.strip() for _, body in raw):
        raise _reject("content", "has no extractable text")
    if len(raw) > limits.max_sections:
        raise _reject("content", f"has {len(raw)} sections; the limit is {limits.max_sections}")

    document_id = meta.document_id or _front_text(front, "id")
    if violations := document_id_violations(
        "metadata.document_id", document_id, "is required (or an 'id' in the Markdown front matter)"
    ):
        raise DocumentRejected(violations)
    title = (
        meta.title or _front_text(front, "title") or title_guess or Path(meta.filename).stem or document_id
    ).strip()[:200]
    sections = tuple(Section(h[:200], b, i) for i, (h, b) in enumerate(raw))
    draft = SopDocument(
        document_id=document_id,
        title=title,
        version="",
        sections=sections,
        equipment_types=_clean_list(meta.equipment_types or front.get("equipment_types"), "metadata.equipment_types"),
        plant_ids=_clean_list(meta.plant_ids or front.get("plant_ids"), "metadata.plant_ids"),
        plant_labels=_scope_labels(meta.plant_ids or front.get("plant_ids"), "metadata.plant_ids"),
        format=fmt,
        filename=meta.filename,
        size_bytes=len(data),
    )
    version = meta.version or _front_text(front, "version")
    if len(version) > 64:
        raise _reject("metadata.version", "must be at most 64 characters")
    # No version given: the content decides, so re-uploading the same file is idempotent and a changed
    # file is a new version.
    return replace(draft, version=version or f"h{draft.content_hash[:10]}")


def parse_markdown(text: str, source: str = "") -> SopDocument:
    """A Markdown SOP whose front matter names at least id, title and version (the shipped corpus)."""
    match = _FRONT_MATTER.match(text)
    front = (yaml.safe_load(match.group(1)) or {}) if match else {}
    for key in ("id", "title", "version"):
        if not front.get(key):
            raise ValueError(f"{source or 'document'}: front matter lacks '{key}'")
    return parse_document(text.encode(), DocumentMeta(format=DocumentFormat.MARKDOWN, filename=source))


# --- chunking -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkingPolicy:
    """How sections are cut into retrieval chunks (a step is never split)."""

    max_chars: int = 1200  # a window never splits a step; a single longer step becomes its own window
    overlap_units: int = 1  # whole steps/paragraphs repeated at the start of the next window


def _units(body: str) -> list[str]:
    """Paragraphs and steps: a numbered/bulleted line plus its continuation lines is one unit."""
    units: list[str] = []
    current: list[str] = []
    for line in body.splitlines():
        if not line.strip():
            if current:
                units.append("\n".join(current))
                current = []
            continue
        if _STEP_START.match(line) and current:
            units.append("\n".join(current))
            current = []
        current.append(line.rstrip())
    if current:
        units.append("\n".join(current))
    return units


def chunk_document(doc: SopDocument, policy: ChunkingPolicy | None = None) -> list[Chunk]:
    policy = policy or ChunkingPolicy()
    chunks: list[Chunk] = []
    for section in doc.sections:
        units = _units(section.body)
        start = 0
        while start < len(units):
            end, size = start, 0
            while end < len(units) and (end == start or size + len(units[end]) + 1 <= policy.max_chars):
                size += len(units[end]) + 1
                end += 1
            chunks.append(
                Chunk(
                    doc.document_id, doc.version, doc.title, section.heading, "\n".join(units[start:end]), len(chunks)
                )
            )
            if end >= len(units):
                break
            start = max(start + 1, end - policy.overlap_units)
    return chunks


# --- the shipped corpus ---------------------------------------------------------------------------


def starter_corpus() -> list[SopDocument]:
    """The five general SOPs and the plant library that ships with the package."""
    folder = resources.files("services.rag") / "corpus"
    return [
        parse_markdown(p.read_text(encoding="utf-8"), p.name)
        for p in sorted(folder.iterdir(), key=lambda p: p.name)
        if p.name.endswith(".md")
    ]


def load_path(path: Path, meta: DocumentMeta | None = None) -> SopDocument:
    meta = meta or DocumentMeta()
    return parse_document(path.read_bytes(), replace(meta, filename=meta.filename or path.name))


def document_files(paths: Iterable[Path]) -> list[Path]:
    """Files named, plus the supported files inside folders named (recursively), sorted."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS))
        else:
            found.append(path)
    return found


def load_folder(path: Path) -> list[SopDocument]:
    return [load_path(p) for p in document_files([path])]
