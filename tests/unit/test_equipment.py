"""One equipment vocabulary: canonical scopes, machine types named in text and ids, the equipment registry, and
what the orchestrator sends each agent (machine type to knowledge, reference set to vision)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from copilot.domain import DiagnosisInput
from copilot.equipment import (
    EquipmentRegistry,
    RegisteredEquipment,
    RegistryError,
    canonical_scope,
    default_vocabulary,
    parse_registry,
)
from services.orchestrator.equipment import DEFAULT_REGISTRY, EquipmentResolver


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("PUNE-IN", "pune-in"),
        (" pune-in ", "pune-in"),
        ("Centrifugal Pump", "centrifugal-pump"),
        ("ＰＵＮＥ-IN", "pune-in"),  # full-width letters (NFKC)
        ("STRASSE-DE", "strasse-de"),
    ],
)
def test_scopes_have_one_canonical_form(given, canonical):
    assert canonical_scope(given) == canonical


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("Chiller trips on high discharge pressure alarm", ["chiller"]),
        ("Forklift battery will not charge overnight", ["forklift"]),
        ("Laser cutter lens is dirty and the cut edge is burred", ["laser-cutter"]),
        ("VFD trips on overvoltage when the conveyor stops", ["belt-conveyor", "electric-motor"]),
        ("Two pumps are leaking", ["pump"]),  # a plural
        ("Screw compressor tripped on high discharge temperature", ["air-compressor"]),
    ],
)
def test_machines_named_in_text_and_ids_are_recognised(text, kinds):
    assert sorted(m.kind.name for m in default_vocabulary().mentioned(text)) == sorted(kinds)


@pytest.mark.parametrize(
    "text",
    [
        "Belt slips on the drive pulley and smells like burning rubber",  # "drive" is a part here, not a VFD
        "Press the reset button twice and the alarm comes back",  # "press" the verb
        "Pressure keeps dropping at the tools",
    ],
)
def test_words_that_are_parts_or_verbs_name_no_machine(text):
    assert default_vocabulary().mentioned(text) == []


@pytest.mark.parametrize(
    ("equipment_id", "kinds"),
    [
        ("PUMP-A-7", ["pump"]),
        ("CNC-A-102", ["cnc-machine"]),
        ("CHILL-4", ["chiller"]),
        ("COMP02", ["air-compressor"]),
        ("FL-07-B", ["forklift"]),
        ("CH-901", []),  # too short to tell
        ("TOOL-9", []),
    ],
)
def test_machines_named_by_an_equipment_id_are_recognised(equipment_id, kinds):
    assert [m.kind.name for m in default_vocabulary().in_equipment_id(equipment_id)] == kinds


def test_type_names_that_count_as_one_machine():
    vocabulary = default_vocabulary()
    assert {"pump", "centrifugal-pump", "coolant-pump"} <= vocabulary.same_machine("pump")
    assert vocabulary.matches("centrifugal-pump", ["pump"])
    assert vocabulary.matches("chiller", [])  # a document for every machine
    assert not vocabulary.matches("chiller", ["air-compressor", "compressed-air-system"])
    assert vocabulary.same_machine("wafer-polisher") == {"wafer-polisher"}  # unknown to the vocabulary: itself
    assert not vocabulary.knows("brushed-steel")  # a vision reference set is no machine type


def test_the_registry_prefers_the_plant_then_an_exact_id_then_the_longer_pattern():
    registry = EquipmentRegistry(
        [
            RegisteredEquipment("PUMP-*", "centrifugal-pump", "brushed-steel"),
            RegisteredEquipment("PUMP-A-*", "coolant-pump", ""),
            RegisteredEquipment("PUMP-A-7", "process-pump", "cast-iron"),
            RegisteredEquipment("PUMP-*", "chiller", "", plant_id="CHEN-IN"),
        ]
    )
    assert registry.resolve("PUNE-IN", "pump-b-1").equipment_type == "centrifugal-pump"  # case-insensitive
    assert registry.resolve("PUNE-IN", "PUMP-A-2").equipment_type == "coolant-pump"
    assert registry.resolve("PUNE-IN", "PUMP-A-7").reference_set == "cast-iron"
    assert registry.resolve("chen-in", "PUMP-A-7").equipment_type == "chiller"  # the plant's own entry wins
    assert registry.resolve("PUNE-IN", "CNC-1") is None
    assert [e.match for e in registry.for_plant("PUNE-IN")] == ["PUMP-*", "PUMP-A-*", "PUMP-A-7"]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"equipment": [{"match": "", "type": "pump"}]}, "equipment[0].match"),
        ({"equipment": [{"match": "P-*", "type": "Not A Slug!"}]}, "equipment[0].type"),
        ({"equipment": [{"match": "P-*", "reference_set": "Brushed Steel"}]}, "equipment[0].reference_set"),
        ({"equipment": [{"match": "P-*"}]}, "equipment[0]: give a type"),
        ({"equipment": [{"match": "P-*", "type": "pump", "colour": "red"}]}, "unknown field(s) colour"),
        ({"equipment": "PUMP-*"}, "a list under 'equipment'"),
    ],
)
def test_a_bad_registry_is_refused_naming_the_entry_and_field(data, field):
    with pytest.raises(RegistryError, match=re.escape(field)):
        parse_registry(data, "registry.yaml")


def test_the_shipped_registry_loads_and_names_known_machine_types():
    registry = EquipmentRegistry.load(DEFAULT_REGISTRY)
    vocabulary = default_vocabulary()
    assert registry.entries and all(vocabulary.knows(e.equipment_type) for e in registry.entries if e.equipment_type)
    pump = registry.resolve("PUNE-IN", "PUMP-A-7")
    assert pump is not None and (pump.equipment_type, pump.reference_set) == ("centrifugal-pump", "brushed-steel")


def test_an_unreadable_registry_file_is_refused(tmp_path: Path):
    broken = tmp_path / "registry.yaml"
    broken.write_text("equipment: [ {match: ")
    with pytest.raises(RegistryError, match="cannot be read"):
        EquipmentRegistry.load(broken)
    assert EquipmentRegistry.load(None).entries == ()


def _input(equipment_id="PUMP-A-7", equipment_type="", reference_set=""):
    return DiagnosisInput(
        "PUNE-IN", equipment_id, "Crack near the outlet flange", b"", "", "", equipment_type, reference_set
    )


async def test_the_orchestrator_sends_the_machine_type_to_knowledge_and_the_reference_set_to_vision():
    resolver = EquipmentResolver(EquipmentRegistry.load(DEFAULT_REGISTRY))
    # only the id: both from the registry
    ctx = await resolver.resolve(_input())
    assert (ctx.equipment_type, ctx.reference_set, ctx.type_source) == ("centrifugal-pump", "brushed-steel", "registry")
    # the request's own values win
    ctx = await resolver.resolve(_input(equipment_type="coolant-pump", reference_set="painted-panel"))
    assert (ctx.equipment_type, ctx.reference_set) == ("coolant-pump", "painted-panel")
    # an earlier client's equipment_type=brushed-steel (a reference set): vision gets it, SOPs the registry's type
    ctx = await resolver.resolve(_input(equipment_id="X-1", equipment_type="brushed-steel"))
    assert (ctx.equipment_type, ctx.reference_set) == ("", "brushed-steel")
    ctx = await resolver.resolve(_input(equipment_type="brushed-steel"))
    assert (ctx.equipment_type, ctx.reference_set) == ("centrifugal-pump", "brushed-steel")
    # an unregistered id: nothing decided here (knowledge reads the id and the problem)
    ctx = await resolver.resolve(_input(equipment_id="TOOL-9"))
    assert (ctx.equipment_type, ctx.reference_set) == ("", "")


async def test_a_type_the_vocabulary_does_not_know_is_a_machine_type_unless_vision_has_it_as_a_reference_set():
    asked = []

    async def reference_sets() -> list[str]:
        asked.append(1)
        return ["brushed-steel", "painted-panel"]

    resolver = EquipmentResolver(EquipmentRegistry(), reference_sets=reference_sets)
    ctx = await resolver.resolve(_input(equipment_id="WP-01", equipment_type="wafer-polisher"))
    assert (ctx.equipment_type, ctx.reference_set, ctx.type_source) == ("wafer-polisher", "", "request")
    ctx = await resolver.resolve(_input(equipment_id="WP-01", equipment_type="painted-panel"))
    assert (ctx.equipment_type, ctx.reference_set) == ("", "painted-panel")
    ctx = await resolver.resolve(_input(equipment_id="WP-01", equipment_type="cnc"))  # a word for a known machine
    assert ctx.equipment_type == "cnc"
    assert len(asked) == 1  # asked once, then cached


def test_words_for_a_machine_resolve_to_its_type():
    vocabulary = default_vocabulary()
    assert vocabulary.resolve_type("cnc") == "cnc-machine"
    assert vocabulary.resolve_type("screw-compressor") == "screw-compressor"
    assert vocabulary.resolve_type("Fork Lift") == "forklift"
    assert vocabulary.resolve_type("wafer-polisher") is None and vocabulary.resolve_type("brushed-steel") is None
