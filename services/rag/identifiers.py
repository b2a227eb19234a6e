"""The identifier index: identifiers worth an exact match (error codes, part numbers, document ids) found in the
chunks, kept in a Chroma collection as identifier -> the ids of the chunks carrying it, one per line. A lookup is a
key lookup, not a scan of every chunk; embeddings blur such codes, so retrieval boosts the chunks found here."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

#: A Chroma collection (typed loosely, as the store's client: Chroma's stubs type results as optional).
Collection = Any
#: The Chroma collection of the index (record id = identifier, upper case; document = chunk ids, one per line).
COLLECTION = "manufacturing_identifiers"
# Identifiers worth an exact match: error codes, part numbers, document ids ("E-0452", "PN-7781-A", "SOP-123"): a
# code (letters, digits and separators) with a digit somewhere ahead in its run of such characters, or a short one.
# The digit is looked for by `identifiers`, once per run: as a look-ahead in the pattern it scanned the rest of the
# run from each of its word starts ("a-a-a-…" without a digit: 32 KB in one chunk took 12 s).
_IDENTIFIER = re.compile(r"(?P<code>\b[A-Za-z][A-Za-z0-9]*(?:[-./][A-Za-z0-9]+)+\b)|\b[A-Z]{1,4}\d{2,}\b")
_DIGIT_OR_RUN_END = re.compile(r"[^A-Za-z0-9._/-]|\d")
_DIGIT = re.compile(r"\d")


def identifiers(text: str) -> list[str]:
    found: dict[str, None] = {}
    stop = -1  # where the last look for a digit ended: a digit, the end of its run, or len(text)
    for m in _IDENTIFIER.finditer(text):
        if m.lastgroup == "code":
            if m.start() > stop:  # else the previous look, from before this start, already answers for it
                hit = _DIGIT_OR_RUN_END.search(text, m.start())
                stop = hit.start() if hit else len(text)
            if not _DIGIT.match(text, stop):
                continue  # no digit ahead in its run: a word with separators, not a code
        if len(m.group(0)) >= 3:
            found[m.group(0)] = None
    return list(found)


_SEPARATOR = re.compile(r"[-./]")
#: Identifiers longer than this are not indexed; of a longer code only the first leading parts are.
MAX_IDENTIFIER_CHARS = 64
MAX_IDENTIFIER_PARTS = 4
#: A query's identifiers looked up at most (a description full of codes is not a lookup of each).
MAX_QUERY_IDENTIFIERS = 16
#: Attempts at a posting-list update that another replica may overwrite at the same moment (read back, merge again).
POSTING_ATTEMPTS = 3


def chunk_identifiers(document_id: str, text: str) -> list[str]:
    """What an identifier query finds a chunk by (upper case): its document's id, every identifier in its text,
    and each identifier's leading parts ("PN-7781-A" is also found as "PN-7781"). Kept on the chunk (metadata) and
    in the identifier index (identifier -> chunk ids), so a lookup is a key lookup, not a scan of every chunk."""
    found = {document_id.upper()}
    for ident in identifiers(text):
        upper = ident.upper()
        if len(upper) > MAX_IDENTIFIER_CHARS:  # not a code someone types (a path, a hash, hostile input)
            continue
        found.add(upper)
        for cut in list(_SEPARATOR.finditer(upper))[:MAX_IDENTIFIER_PARTS]:
            if cut.start() >= 3 and any(ch.isdigit() for ch in upper[: cut.start()]):
                found.add(upper[: cut.start()])
    return sorted(found)


def postings(chunk_ids: Sequence[str], identifiers_per_chunk: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """Each identifier -> the ids of the chunks carrying it (chunk order kept)."""
    postings: dict[str, list[str]] = {}
    for chunk_id, idents in zip(chunk_ids, identifiers_per_chunk, strict=True):
        for ident in idents:
            postings.setdefault(ident, []).append(chunk_id)
    return postings


def post(index: Collection, document_id: str, postings: Mapping[str, Sequence[str]], previous: Sequence[str]) -> bool:
    """Make the index list, for this document, exactly `postings` (identifier -> its chunk ids): the
    document's entries under `previous` and the new identifiers are rewritten, other documents' entries kept.
    Another replica may rewrite one of these records at the same moment (Chroma has no compare-and-set), so
    each write is read back and merged again when it lost; a lost entry costs only the exact-match boost.
    False when it still lost after POSTING_ATTEMPTS (logged)."""
    keys = sorted(set(postings) | set(previous))
    prefix = f"{document_id}@"
    for start in range(0, len(keys), 1000):
        part = keys[start : start + 1000]
        for _ in range(POSTING_ATTEMPTS):
            found = index.get(ids=part, include=["documents"])
            lists = {i: (d or "").split("\n") for i, d in zip(found["ids"], found["documents"], strict=True)}
            wanted = {
                key: [c for c in lists.get(key, []) if c and not c.startswith(prefix)] + list(postings.get(key, []))
                for key in part
            }
            empty = [key for key, ids in wanted.items() if not ids]
            kept = {key: ids for key, ids in wanted.items() if ids}
            if kept:
                index.upsert(
                    ids=list(kept),
                    documents=["\n".join(ids) for ids in kept.values()],
                    embeddings=[[1.0]] * len(kept),
                )
            if empty:
                index.delete(ids=empty)
            check = index.get(ids=part, include=["documents"])
            # this document's entries as they now stand, per identifier: exactly what was written, or it lost
            ours = {
                i: {c for c in (d or "").split("\n") if c.startswith(prefix)}
                for i, d in zip(check["ids"], check["documents"], strict=True)
            }
            if all(ours.get(key, set()) == set(postings.get(key, ())) for key in part):
                break
        else:
            log.warning("identifier index: the entries of %s lost a concurrent update", document_id)
            return False
    return True


def lookup(index: Collection, terms: Sequence[str]) -> list[str]:
    """The ids of the chunks carrying any of `terms` (any case), each once, at most MAX_QUERY_IDENTIFIERS terms."""
    wanted = [t for t in dict.fromkeys(t.upper() for t in terms) if len(t) <= MAX_IDENTIFIER_CHARS]
    wanted = wanted[:MAX_QUERY_IDENTIFIERS]
    if not wanted:
        return []
    found = index.get(ids=wanted, include=["documents"])
    return list(dict.fromkeys(c for d in found["documents"] for c in (d or "").split("\n") if c))
