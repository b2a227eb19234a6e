"""What a piece of equipment is: one vocabulary of machine types for SOPs, requests and the equipment registry.

Two things were once one request field: the *equipment type* (the kind of machine an SOP is written for: pump,
chiller, cnc-lathe) and the *reference set* (what the machine's surfaces look like to the vision agent:
brushed-steel, painted-panel). They are separate now:

* `canonical_scope` is the one form plant ids and equipment types are compared in, wherever they are compared
  (ingest, retrieval, listings, the CLI); what users typed is still what they are shown.
* `EquipmentVocabulary` (equipment_types.yaml beside this file) groups the type names that mean one kind of
  machine and the words technicians use for it, so that a request about a chiller is recognised as one even
  when no SOP in scope covers chillers.
* `EquipmentRegistry` maps equipment ids (exact or patterns, per plant) to their type and reference set, loaded
  from a YAML file (`ORCHESTRATOR_EQUIPMENT_REGISTRY`), so a caller who sends only `PUMP-A-7` gets pump SOPs
  and the pump's references.

Pure: no gRPC, no I/O beyond reading the files it is given."""

from __future__ import annotations

import fnmatch
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

VOCABULARY_FILE = Path(__file__).with_name("equipment_types.yaml")
_BLANKS = re.compile(r"\s+")
_KEBAB = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
_WORDS = re.compile(r"[^\W_]+", re.UNICODE)
_ID_LETTERS = re.compile(r"[^\W\d_]+", re.UNICODE)


def canonical_scope(value: str) -> str:
    """The form a plant id or equipment type is compared in: Unicode NFKC, trimmed, case-folded, blanks as '-'
    ("PUNE-IN" and "pune-in" are one plant; "Centrifugal Pump" is "centrifugal-pump")."""
    return _BLANKS.sub("-", unicodedata.normalize("NFKC", value).strip().casefold())


def _words(text: str) -> list[str]:
    """Lower-case words of a text; letters and digits, split everywhere else ("PUMP-A-7" -> pump, a, 7)."""
    return [w.casefold() for w in _WORDS.findall(unicodedata.normalize("NFKC", text))]


@dataclass(frozen=True)
class EquipmentKind:
    """One kind of machine: its own type name first, the other names that count as it, and technicians' words."""

    names: tuple[str, ...]
    words: tuple[tuple[str, ...], ...]  # each a phrase of one or more words
    id_words: frozenset[str] = frozenset()  # abbreviations read in equipment ids only ("chill", "comp", "fl")

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class TypeMention:
    """A machine type named by a request: its kind, and the words that named it."""

    kind: EquipmentKind
    phrase: str


class EquipmentVocabulary:
    """The machine types and the words that name them, to tell what a problem is about."""

    def __init__(self, kinds: Sequence[EquipmentKind]) -> None:
        self.kinds = tuple(kinds)
        self._by_name: dict[str, list[EquipmentKind]] = {}
        for kind in self.kinds:
            for name in kind.names:
                self._by_name.setdefault(name, []).append(kind)
        # longest phrases first, so "air compressor" wins over "compressor" where both fit
        self._phrases = sorted(
            ((phrase, kind) for kind in self.kinds for phrase in kind.words), key=lambda p: -len(p[0])
        )

    @classmethod
    def load(cls, path: Path = VOCABULARY_FILE) -> EquipmentVocabulary:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        kinds = []
        for entry in data.get("types", []):
            names = tuple(dict.fromkeys(canonical_scope(str(n)) for n in entry.get("names", []) if str(n).strip()))
            if not names or not all(_KEBAB.match(n) for n in names):
                raise ValueError(f"{path}: type names must be kebab-case, got {entry.get('names')!r}")
            words = tuple(tuple(_words(str(w))) for w in entry.get("words", []) if _words(str(w)))
            id_words = frozenset(canonical_scope(str(w)) for w in entry.get("id_words", []) if str(w).strip())
            kinds.append(EquipmentKind(names, words, id_words))
        return cls(kinds)

    def knows(self, equipment_type: str) -> bool:
        return canonical_scope(equipment_type) in self._by_name

    def resolve_type(self, value: str) -> str | None:
        """A machine type the copilot knows for what a caller wrote: itself when the vocabulary names it, else the
        one kind its words name ("cnc" -> cnc-machine, "screw compressor" -> air-compressor); None otherwise."""
        name = canonical_scope(value)
        if self.knows(name):
            return name
        kinds = {m.kind.name for m in self.mentioned(name.replace("-", " "))}
        return kinds.pop() if len(kinds) == 1 else None

    def same_machine(self, equipment_type: str) -> frozenset[str]:
        """Every type name that counts as `equipment_type` (itself included, known to the vocabulary or not)."""
        name = canonical_scope(equipment_type)
        return frozenset({name, *(n for kind in self._by_name.get(name, ()) for n in kind.names)})

    def matches(self, equipment_type: str, document_types: Iterable[str]) -> bool:
        """Whether a document written for `document_types` is written for `equipment_type` (a document written
        for every type, i.e. with no types, is)."""
        types = {canonical_scope(t) for t in document_types}
        return not types or bool(types & self.same_machine(equipment_type))

    def in_equipment_id(self, equipment_id: str) -> list[TypeMention]:
        """The machine types an equipment id names by its letters ("CHILL-4", "COMP02", "FL-07-B")."""
        tokens = _ID_LETTERS.findall(canonical_scope(equipment_id))
        found: dict[str, TypeMention] = {}
        for token in tokens:
            for kind in self.kinds:
                if token in kind.id_words:
                    found.setdefault(kind.name, TypeMention(kind, token))
        return list(found.values())

    def mentioned(self, text: str) -> list[TypeMention]:
        """The machine types a text names, in the order of the vocabulary, each once: "Chiller trips on high
        discharge pressure" -> chiller; an equipment id "CONV-12" -> belt-conveyor."""
        words = _words(text)
        plural = [w[:-1] if len(w) > 3 and w.endswith("s") else w for w in words]
        found: dict[str, TypeMention] = {}
        taken: set[int] = set()
        for phrase, kind in self._phrases:
            n = len(phrase)
            for start in range(len(words) - n + 1):
                if taken.intersection(range(start, start + n)):
                    continue
                window = words[start : start + n]
                if tuple(window) == phrase or (*window[:-1], plural[start + n - 1]) == phrase:
                    taken.update(range(start, start + n))
                    found.setdefault(kind.name, TypeMention(kind, " ".join(phrase)))
        return [found[k.name] for k in self.kinds if k.name in found]


@lru_cache(maxsize=1)
def default_vocabulary() -> EquipmentVocabulary:
    return EquipmentVocabulary.load()


# --- the registry ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredEquipment:
    """One registry entry: equipment ids at a plant ("*" = every plant) matched exactly or by a glob pattern
    (`PUMP-*`), case-insensitively."""

    match: str
    equipment_type: str = ""
    reference_set: str = ""
    plant_id: str = "*"
    description: str = ""

    @property
    def is_pattern(self) -> bool:
        return any(ch in self.match for ch in "*?[")

    def applies_at(self, plant_id: str) -> bool:
        return self.plant_id == "*" or canonical_scope(self.plant_id) == canonical_scope(plant_id)

    def applies(self, plant_id: str, equipment_id: str) -> bool:
        return self.applies_at(plant_id) and fnmatch.fnmatchcase(
            canonical_scope(equipment_id), canonical_scope(self.match)
        )


class RegistryError(ValueError):
    """The registry file is not valid; the message names the entry and the field."""


class EquipmentRegistry:
    """Resolution order for one request: an entry for this plant beats one for every plant; an exact id beats a
    pattern; of two patterns the longer (more specific) wins, then the one listed first."""

    def __init__(self, entries: Sequence[RegisteredEquipment] = ()) -> None:
        self.entries = tuple(entries)

    @classmethod
    def load(cls, path: Path | None) -> EquipmentRegistry:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise RegistryError(f"equipment registry {path} cannot be read: {exc}") from None
        return cls(parse_registry(data, str(path)))

    def resolve(self, plant_id: str, equipment_id: str) -> RegisteredEquipment | None:
        best: tuple[tuple[int, int, int, int], RegisteredEquipment] | None = None
        for position, entry in enumerate(self.entries):
            if not entry.applies(plant_id, equipment_id):
                continue
            rank = (entry.plant_id != "*", not entry.is_pattern, len(entry.match), -position)
            if best is None or rank > best[0]:
                best = (rank, entry)
        return best[1] if best else None

    def for_plant(self, plant_id: str = "") -> list[RegisteredEquipment]:
        return [e for e in self.entries if not plant_id or e.applies_at(plant_id)]


_REFERENCE_SET = re.compile(r"^[a-z][a-z0-9-]{1,39}$")


def parse_registry(data: object, source: str = "registry") -> list[RegisteredEquipment]:
    if not isinstance(data, dict) or not isinstance(data.get("equipment", []), list):
        raise RegistryError(f"{source}: expected a mapping with a list under 'equipment'")
    entries = []
    for n, item in enumerate(data.get("equipment", [])):
        where = f"{source}: equipment[{n}]"
        if not isinstance(item, dict):
            raise RegistryError(f"{where}: expected a mapping")
        unknown = set(item) - {"match", "type", "reference_set", "plant", "description"}
        if unknown:
            raise RegistryError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        match = str(item.get("match", "")).strip()
        if not match or len(match) > 64:
            raise RegistryError(f"{where}.match: an equipment id or pattern of 1 to 64 characters is required")
        etype = canonical_scope(str(item.get("type", "")))
        if etype and not _KEBAB.match(etype):
            raise RegistryError(f"{where}.type: '{etype}' must be kebab-case")
        rset = str(item.get("reference_set", "")).strip()
        if rset and not _REFERENCE_SET.match(rset):
            raise RegistryError(f"{where}.reference_set: '{rset}' must match {_REFERENCE_SET.pattern}")
        if not etype and not rset:
            raise RegistryError(f"{where}: give a type, a reference_set or both")
        plant = str(item.get("plant", "*")).strip() or "*"
        entries.append(RegisteredEquipment(match, etype, rset, plant, str(item.get("description", ""))[:200]))
    return entries
