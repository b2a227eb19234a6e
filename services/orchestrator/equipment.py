"""What the orchestrator tells each agent about a request's equipment: the knowledge agent gets the machine type
(what SOPs are written for), the vision agent the reference set (what its surfaces look like). Both come from
the request when it says, else from the equipment registry (`copilot.equipment.EquipmentRegistry`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from copilot.domain import DiagnosisInput
from copilot.equipment import EquipmentRegistry, EquipmentVocabulary, canonical_scope, default_vocabulary

#: The registry the local mesh starts with (ORCHESTRATOR_EQUIPMENT_REGISTRY names another; empty: none).
DEFAULT_REGISTRY = Path(__file__).with_name("equipment_registry.yaml")


@dataclass(frozen=True)
class EquipmentContext:
    equipment_type: str  # for the knowledge agent ("" = let it tell from the id and the problem)
    reference_set: str  # for the vision agent ("" = its generic set)
    type_source: str  # "request" | "registry" | ""
    reference_source: str  # "request" | "registry" | "request (equipment_type, compatibility)" | ""


class EquipmentResolver:
    def __init__(self, registry: EquipmentRegistry | None = None, vocabulary: EquipmentVocabulary | None = None):
        self.registry = registry or EquipmentRegistry()
        self.vocabulary = vocabulary or default_vocabulary()

    def resolve(self, request: DiagnosisInput) -> EquipmentContext:
        entry = self.registry.resolve(request.plant_id, request.equipment_id)
        asked_type = canonical_scope(request.equipment_type)
        # Earlier releases took equipment_type as the vision reference set ("brushed-steel"): a value that is no
        # machine type the vocabulary knows still selects the reference set when nothing else does, and the
        # registry's machine type, if any, is used for the SOPs instead of it.
        legacy = bool(asked_type) and not self.vocabulary.knows(asked_type)
        if asked_type and not (legacy and entry is not None and entry.equipment_type):
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
