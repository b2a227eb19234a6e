"""Parsing and chunking of Markdown, plain-text and PDF documents, and the precise refusals of bad uploads."""

from __future__ import annotations

import itertools

import pytest

from services.rag.corpus import (
    ChunkingPolicy,
    DocumentFormat,
    DocumentLimits,
    DocumentMeta,
    DocumentRejected,
    chunk_document,
    parse_document,
)

MANUAL_TXT = """CHILLER CH-150 SERVICE NOTES

High condenser pressure:
1. Clean the condenser coil with a soft brush.
2. Check the condenser fan turns freely.
3. Verify the refrigerant charge with the service gauges.

Low flow alarm F-21
The flow switch trips when the chilled water flow is below 40 l/min.
1. Open the strainer and remove debris.
2. Bleed air from the highest point of the circuit.
"""


def make_pdf(pages: list[str]) -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("helvetica", size=11)
    for text in pages:
        pdf.add_page()
        for line in text.splitlines():
            pdf.cell(0, 6, line, new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def test_markdown_front_matter_fills_what_the_upload_leaves_unset():
    text = b"---\nid: SOP-777\ntitle: Press brake\nversion: '4'\nequipment_types: [press-brake]\n---\n# Press brake\n## Setup\n1. Clean the die.\n"
    doc = parse_document(text, DocumentMeta(filename="x.md"))
    assert (doc.document_id, doc.title, doc.version, doc.equipment_types) == (
        "SOP-777",
        "Press brake",
        "4",
        ("press-brake",),
    )
    overridden = parse_document(text, DocumentMeta(document_id="SOP-778", version="5", filename="x.md"))
    assert (overridden.document_id, overridden.version) == ("SOP-778", "5")


def test_plain_text_headings_and_steps_become_sections():
    doc = parse_document(MANUAL_TXT.encode(), DocumentMeta(document_id="CH-150", filename="chiller.txt"))
    assert doc.format is DocumentFormat.TEXT
    assert [s.heading for s in doc.sections] == ["High condenser pressure", "Low flow alarm F-21"]
    low_flow = next(s for s in doc.sections if s.heading.startswith("Low flow"))
    assert low_flow.steps() == [
        "Open the strainer and remove debris.",
        "Bleed air from the highest point of the circuit.",
    ]
    assert doc.title == "CHILLER CH-150 SERVICE NOTES"  # no title given: the lone first line
    untitled = parse_document(
        MANUAL_TXT.split("\n", 2)[2].encode(), DocumentMeta(document_id="CH-150", filename="chiller.txt")
    )
    assert untitled.title == "chiller"  # nor a title line: the file name


def test_pdf_text_is_extracted_page_by_page():
    data = make_pdf(
        [
            "Flame failure:\n1. Check the gas valve.\n2. Clean the UV scanner.",
            "Refractory inspection:\n1. Look for cracks in the lining.",
        ]
    )
    doc = parse_document(data, DocumentMeta(document_id="KILN-9", title="Kiln", version="1", filename="kiln.pdf"))
    assert doc.format is DocumentFormat.PDF
    headings = [s.heading for s in doc.sections]
    assert headings == ["Flame failure", "Refractory inspection"]
    assert doc.sections[0].steps() == ["Check the gas valve.", "Clean the UV scanner."]


def test_without_a_version_the_content_decides():
    a = parse_document(MANUAL_TXT.encode(), DocumentMeta(document_id="CH-150", filename="c.txt"))
    b = parse_document(MANUAL_TXT.encode(), DocumentMeta(document_id="CH-150", filename="c.txt"))
    changed = parse_document(
        MANUAL_TXT.replace("40", "45").encode(), DocumentMeta(document_id="CH-150", filename="c.txt")
    )
    assert a.version == b.version and a.version.startswith("h")
    assert changed.version != a.version


def test_chunks_keep_steps_whole_overlap_and_carry_their_position():
    steps = "\n".join(
        f"{i}. Step number {i} of the long procedure, with enough words to take room." for i in range(1, 41)
    )
    doc = parse_document(
        f"---\nid: LONG-1\ntitle: Long\nversion: '1'\n---\n## Procedure\n{steps}\n## Short\n1. One.\n".encode(),
        DocumentMeta(filename="l.md"),
    )
    chunks = chunk_document(doc, ChunkingPolicy(max_chars=600, overlap_units=1))
    procedure = [c for c in chunks if c.section == "Procedure"]
    assert len(procedure) >= 5
    assert [c.position for c in chunks] == list(range(len(chunks)))
    for first, second in itertools.pairwise(procedure):
        assert len(first.text) <= 600
        assert first.text.splitlines()[-1] == second.text.splitlines()[0]  # one whole step of overlap
    covered = {line for c in procedure for line in c.text.splitlines()}
    assert len(covered) == 40  # nothing lost, no step cut in half
    assert chunks[-1].section == "Short" and chunks[-1].chunk_id == "LONG-1@1#" + str(len(chunks) - 1)


@pytest.mark.parametrize(
    ("data", "meta", "field", "fragment"),
    [
        (b"", DocumentMeta(document_id="A-1", filename="a.md"), "content", "empty"),
        (b"x" * 2048, DocumentMeta(document_id="A-1", filename="a.txt"), "content", "limit"),
        (bytes(range(256)) * 4, DocumentMeta(document_id="A-1", filename="a.txt"), "content", "binary"),
        (b"\xff\xfe\xfa garbage \xc3", DocumentMeta(document_id="A-1", filename="a.md"), "content", "UTF-8"),
        (b"%PDF-1.7 this is not really a pdf", DocumentMeta(document_id="A-1", filename="a.pdf"), "content", "PDF"),
        (b"PK\x03\x04 zip", DocumentMeta(document_id="A-1", filename="a.pdf"), "content", "not a PDF"),
        (
            b"## A\n1. b\n",
            DocumentMeta(document_id="A-1", filename="a.rtf"),
            "metadata.format",
            "unknown document format",
        ),
        (b"## A\n1. b\n", DocumentMeta(filename="a.md"), "metadata.document_id", "required"),
        (
            b"## A\n1. b\n",
            DocumentMeta(document_id="bad id with spaces", filename="a.md"),
            "metadata.document_id",
            "letters",
        ),
        (
            b"## A\n1. b\n",
            DocumentMeta(document_id="A-1", equipment_types=("Press Brake!",), filename="a.md"),
            "metadata.equipment_types",
            "kebab-case",
        ),
        (b"---\nid: [unclosed\n---\n## A\n1. b\n", DocumentMeta(filename="a.md"), "content", "YAML"),
        (b"   \n\n  ", DocumentMeta(document_id="A-1", filename="a.txt"), "content", "no extractable text"),
    ],
)
def test_bad_uploads_are_refused_with_the_field_at_fault(data, meta, field, fragment):
    with pytest.raises(DocumentRejected) as refused:
        parse_document(data, meta, DocumentLimits(max_bytes=1024))
    assert refused.value.violations[0].field == field
    assert fragment.lower() in refused.value.violations[0].description.lower()


def _alias_bomb(field: str) -> bytes:
    """A 1 KB front matter whose `field` is an alias to nine levels of ten aliases each: 10^9 leaves once written out
    as text (before the check, turning it into a title took the parser past 10 s and gigabytes)."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    return ("---\n" + "\n".join(levels) + f"\nid: SOP-BOMB\n{field}: *l8\n---\n## Step\n1. Do it.\n").encode()


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        (_alias_bomb("title"), "content", "front matter 'title' must be a single value"),
        (_alias_bomb("version"), "content", "front matter 'version' must be a single value"),
        (_alias_bomb("equipment_types"), "metadata.equipment_types", "must be a list of names"),
        (_alias_bomb("plant_ids"), "metadata.plant_ids", "must be a list of names"),
        (("---\nid: SOP-1\nx: " + "[" * 5000 + "]" * 5000 + "\n---\n## A\n1. b\n").encode(), "content", "too deeply"),
    ],
)
def test_hostile_front_matter_is_refused_before_it_is_expanded(data, field, fragment):
    with pytest.raises(DocumentRejected) as refused:
        parse_document(data, DocumentMeta(filename="bomb.md"))
    (violation,) = refused.value.violations
    assert violation.field == field and fragment in violation.description, violation


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [(b"/FlateDecode", b"/FlatHDecode", "Unsupported filter"), (b"/FlateDecode", b"/Fl", "deprecated")],
)
def test_a_pdf_pypdf_cannot_decode_is_refused_with_the_field(old, new, fragment):
    """pypdf raises more than PdfReadError on malformed files (NotImplementedError for an unknown filter, its own
    DeprecationError, LimitReachedError...): each is a refusal of the content, not an internal error."""
    data = make_pdf(["Flame failure:\n1. Check the gas valve."]).replace(old, new)
    with pytest.raises(DocumentRejected) as refused:
        parse_document(data, DocumentMeta(document_id="KILN-9", filename="kiln.pdf"))
    (violation,) = refused.value.violations
    assert violation.field == "content" and "not a readable PDF" in violation.description
    assert fragment in violation.description


def _word_document() -> bytes:
    """A Word document as Word writes one (python-docx): a title, sections, bullets, numbered steps and a table."""
    import io

    import docx

    document = docx.Document()
    document.add_heading("Hydraulic press HP-200: seal replacement", 0)
    document.add_paragraph("Applies to hydraulic presses at PUNE-IN.")
    document.add_heading("Safety", 1)
    document.add_paragraph("Lock out the pump (LOTO) before opening the circuit.", style="List Bullet")
    document.add_heading("Procedure", 1)
    for step in (
        "Depressurise the circuit to 0 bar.",
        "Remove the seal PN-SEAL-45 with the puller.",
        "Fit the new seal and torque to 25 Nm.",
    ):
        document.add_paragraph(step, style="List Number")
    table = document.add_table(rows=2, cols=2)
    for row, (name, value) in zip(table.rows, (("Torque", "25 Nm"), ("Pressure", "0 bar")), strict=True):
        row.cells[0].text, row.cells[1].text = name, value
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def test_a_word_document_is_read_as_its_title_sections_and_numbered_steps():
    doc = parse_document(_word_document(), DocumentMeta(document_id="HP-200-SEAL", filename="hp-200.docx"))
    assert doc.format is DocumentFormat.DOCX
    assert doc.title == "Hydraulic press HP-200: seal replacement"
    assert [s.heading for s in doc.sections] == ["Overview", "Safety", "Procedure"]
    assert doc.sections[1].steps() == ["Lock out the pump (LOTO) before opening the circuit."]
    procedure = doc.sections[2]
    assert procedure.steps() == [
        "Depressurise the circuit to 0 bar.",
        "Remove the seal PN-SEAL-45 with the puller.",
        "Fit the new seal and torque to 25 Nm.",
    ]
    assert "Torque| 25 Nm" in procedure.body and "---" not in procedure.body  # a table's rows, as text
    chunks = chunk_document(doc)
    assert any("PN-SEAL-45" in c.text for c in chunks)


def test_an_html_page_is_read_without_its_scripts_styles_images_or_link_targets():
    page = b"""<!doctype html><html><head><title>ignored</title><style>p { color: red }</style>
    <script>document.write('injected')</script></head><body>
    <h1>Chiller CH-150: low flow</h1><p>The flow switch trips below 40 l/min.</p>
    <h2>Procedure</h2><ol><li>Open the strainer and remove debris.</li>
    <li>Bleed air from the highest point (see <a href="http://intranet/manual">the manual</a>).</li></ol>
    <h2>Notes</h2><p>Flow &amp; pressure are logged.</p><img src="diagram.png" alt="diagram"></body></html>"""
    doc = parse_document(page, DocumentMeta(document_id="CH-150-FLOW", filename="ch-150.html"))
    assert doc.format is DocumentFormat.HTML and doc.title == "Chiller CH-150: low flow"
    assert [s.heading for s in doc.sections] == ["Overview", "Procedure", "Notes"]
    assert doc.sections[1].steps() == [
        "Open the strainer and remove debris.",
        "Bleed air from the highest point (see the manual).",
    ]
    text = "\n".join(s.body for s in doc.sections)
    assert "Flow & pressure are logged." in text
    for absent in ("injected", "color", "intranet", "diagram.png", "ignored"):
        assert absent not in text


def _zip(parts: dict[str, bytes]) -> bytes:
    import io
    import zipfile

    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in parts.items():
            archive.writestr(name, data)
    return out.getvalue()


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"%PDF-1.4 not a word file", "not a zip archive"),
        (_zip({"readme.txt": b"hello"}), "without word/document.xml"),
        (_zip({"word/document.xml": b"<w:document><unclosed>"}), "not a readable Word document"),
    ],
)
def test_an_upload_that_is_not_a_readable_word_document_is_refused_with_the_field(data, fragment):
    with pytest.raises(DocumentRejected) as refused:
        parse_document(data, DocumentMeta(document_id="BAD-1", filename="bad.docx"))
    (violation,) = refused.value.violations
    assert violation.field == "content" and fragment in violation.description


def test_a_word_archive_that_unpacks_past_the_limit_is_refused_before_it_is_parsed(monkeypatch):
    """A zip bomb: a few KB that unpack to far more. The declared sizes are checked before any part is read."""
    from services.rag import corpus

    monkeypatch.setattr(corpus, "_DOCX_MAX_UNPACKED", 1024 * 1024)
    bomb = _zip({"word/document.xml": b"<a>" + b" " * (4 * 1024 * 1024) + b"</a>"})
    assert len(bomb) < 64 * 1024
    with pytest.raises(DocumentRejected) as refused:
        parse_document(bomb, DocumentMeta(document_id="BOMB-1", filename="bomb.docx"))
    assert "unpacks to" in refused.value.violations[0].description


def test_a_file_without_an_id_of_its_own_is_sent_with_its_file_names_stem():
    """`copilot ingest folder/`: a Word, PDF, HTML or text SOP named by its id needs no --id each; Markdown says its
    own id (a sent one would win over its front matter), and a name that is no valid id gives none."""
    from pathlib import Path

    from copilot_cli.knowledge import default_document_id

    assert default_document_id(Path("manuals/SOP-123.docx")) == "SOP-123"
    assert default_document_id(Path("HP-200_seal.v2.PDF")) == "HP-200_seal.v2"
    assert default_document_id(Path("chiller.html")) == "chiller"
    assert default_document_id(Path("CHILL-901.md")) == ""
    assert default_document_id(Path("pump manual (final).docx")) == ""
    assert default_document_id(Path("notes.rtf")) == ""


def test_an_html_page_is_read_in_the_charset_it_declares():
    page = "<meta charset='windows-1252'><h1>Ofen: Temperatur zu hoch</h1><ol><li>Brenner prüfen – 850 °C.</li></ol>"
    doc = parse_document(page.encode("cp1252"), DocumentMeta(document_id="OFEN-1", filename="ofen.htm"))
    assert doc.title == "Ofen: Temperatur zu hoch" and doc.sections[0].steps() == ["Brenner prüfen – 850 °C."]
    utf8 = parse_document(
        page.replace("windows-1252", "utf-8").encode(), DocumentMeta(document_id="O", filename="o.htm")
    )
    assert utf8.sections[0].steps() == ["Brenner prüfen – 850 °C."]
    for data, fragment in (
        (b"<meta charset=klingon><h1>T</h1><p>x</p>", "does not know: 'klingon'"),
        (b"<meta charset=utf-8><h1>T</h1><p>\xff\xfe</p>", "not valid UTF-8"),
    ):
        with pytest.raises(DocumentRejected) as refused:
            parse_document(data, DocumentMeta(document_id="BAD-2", filename="bad.html"))
        assert fragment in refused.value.violations[0].description
