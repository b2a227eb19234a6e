"""`copilot equipment`: what equipment the mesh knows (ListEquipment): the registry's entries, the machine types
the plant's SOPs are written for, and the vision reference sets."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from google.protobuf.json_format import MessageToDict
from rich.table import Table

from copilot.client import canonical_plant
from copilot.equipment import default_vocabulary
from copilot.v1 import copilot_pb2, copilot_pb2_grpc
from copilot_cli.common import ORCHESTRATOR_ADDR, AsJson, OrchestratorAddr, Token, connected, out


def equipment(
    plant: Annotated[str, typer.Option("--plant", help="only what applies at this plant, e.g. PUNE-IN")] = "",
    as_json: AsJson = False,
    addr: OrchestratorAddr = ORCHESTRATOR_ADDR,
    token: Token = "",
) -> None:
    """List the equipment registry, the machine types SOPs are written for, and the vision reference sets."""
    with connected(addr, token) as (channel, metadata):
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)
        response = stub.ListEquipment(
            copilot_pb2.ListEquipmentRequest(plant_id=canonical_plant(plant)), metadata=metadata, timeout=30
        )
    if as_json:
        out.print_json(json.dumps(MessageToDict(response, preserving_proto_field_name=True)))
        return
    registry = Table(
        "equipment id", "plant", "machine type", "reference set", "description", title="equipment registry"
    )
    for e in response.equipment:
        registry.add_row(e.match, e.plant_id, e.equipment_type or "-", e.reference_set or "-", e.description)
    out.print(registry)
    covered = {t.equipment_type for t in response.sop_types}
    types = Table(
        "machine type", "SOPs written for it", title="machine types with SOPs" + (f" at {plant}" if plant else "")
    )
    for t in response.sop_types:
        types.add_row(t.equipment_type, ", ".join(t.document_ids))
    out.print(types)
    vocabulary = default_vocabulary()  # "cnc-machine" is covered by an SOP written for "cnc-mill"
    uncovered = sorted(
        {t for t in (e.equipment_type for e in response.equipment) if t and not vocabulary.same_machine(t) & covered}
    )
    if uncovered and response.sop_types:
        out.print(
            f"registered types no SOP is written for (their diagnoses go to manual review): {', '.join(uncovered)}",
            markup=False,
            highlight=False,
        )
    out.print("vision reference sets: " + (", ".join(response.reference_sets) or "none"), markup=False, highlight=False)
    for missing in response.unavailable:
        out.print(f"[yellow]not listed: {missing}[/]")
