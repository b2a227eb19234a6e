"""What the orchestrator tells each agent about a request's equipment: the knowledge agent gets the machine type
(what SOPs are written for), the vision agent the reference set (what its surfaces look like). Both come from
the request when it says, else from the equipment registry (`copilot.equipment.EquipmentRegistry`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from copilot.domain import DiagnosisInput
from copilot.equipment import EquipmentRegistry, EquipmentVocabulary, canonical_scope, default_vocabulary

log = logging.getLogger(__name__)

#: The registry the local mesh starts with (ORCHESTRATOR_EQUIPMENT_REGISTRY names another; empty: none).
DEFAULT_REGISTRY = Path(__file__).with_name("equipment_registry.yaml")
#: The vision agent's reference sets (ListReferences), asked at most this often.
REFERENCE_SETS_TTL_S = 60.0
ReferenceSets = Callable[[], Awaitable[list[str]]]


@dataclass(frozen=True)
class EquipmentContext:
    equipment_type: str  # for the knowledge agent ("" = let it tell from the id and the problem)
    reference_set: str  # for the vision agent ("" = its generic set)
    type_source: str  # "request" | "registry" | ""
    reference_source: str  # "request" | "registry" | "request (equipment_type, compatibility)" | ""


class EquipmentResolver:
    """`reference_sets` asks the vision agent which reference sets exist: a request's `equipment_type` that names
    one (what earlier releases meant by the field: "brushed-steel") selects it for vision and is no machine type;
    any other value is the machine type, known to the copilot or not. Without it (in-process fakes, vision down),
    a value the vocabulary does not know is taken as a reference set, as before."""

    def __init__(
        self,
        registry: EquipmentRegistry | None = None,
        vocabulary: EquipmentVocabulary | None = None,
        reference_sets: ReferenceSets | None = None,
    ) -> None:
        self.registry = registry or EquipmentRegistry()
        self.vocabulary = vocabulary or default_vocabulary()
        self._reference_sets = reference_sets
        self._known_sets: tuple[float, frozenset[str]] | None = None

    async def _is_reference_set(self, value: str) -> bool:
        if self._reference_sets is None:
            return True
        now = time.monotonic()
        if self._known_sets is None or now - self._known_sets[0] > REFERENCE_SETS_TTL_S:
            try:
                self._known_sets = (now, frozenset(await self._reference_sets()))
            except Exception as exc:  # vision down: keep what was known, else decide as without it
                log.warning("vision reference sets unavailable (%s)", type(exc).__name__)
                if self._known_sets is None:
                    return True
        return value in self._known_sets[1]

    async def resolve(self, request: DiagnosisInput) -> EquipmentContext:
        entry = self.registry.resolve(request.plant_id, request.equipment_id)
        asked_type = canonical_scope(request.equipment_type)
        # Earlier releases took equipment_type as the vision reference set ("brushed-steel"): such a value still
        # selects the reference set when nothing else does, and the registry's machine type, if any, is used for
        # the SOPs instead of it.
        legacy = (
            bool(asked_type)
            and self.vocabulary.resolve_type(asked_type) is None
            and await self._is_reference_set(asked_type)
        )
        if asked_type and not legacy:
            equipment_type, type_source = asked_type, "request"
        elif entry is not None and entry.equipment_type:
            equipment_type, type_source = entry.equipment_type, "registry"
        else:
            equipment_type, type_source = "", ""
        if request.reference_set:
            reference_set, reference_source = request.reference_set, "request"
        elif entry is not None and entry.reference_set:
            reference_set, reference_source = entry.reference_set, "registry"
        elif legacy:
            reference_set, reference_source = asked_type, "request (equipment_type, compatibility)"
        else:
            reference_set, reference_source = "", ""
        return EquipmentContext(equipment_type, reference_set, type_source, reference_source)
