"""google.api.field_behavior in the public protos agrees with what the server enforces: every REQUIRED field is one
the protovalidate rules refuse when it is left empty, and every field whose empty value the rules refuse on a
request is marked REQUIRED; OUTPUT_ONLY marks what only the server fills."""

from __future__ import annotations

import protovalidate
from google.api import field_behavior_pb2

from copilot.client import diagnose_request
from copilot.v1 import copilot_pb2

REQUESTS = {
    "DiagnoseRequest": lambda: diagnose_request("PUNE-IN", "CNC-A-102", "Spindle overheating during the shift"),
    "StreamDiagnoseRequest": lambda: copilot_pb2.StreamDiagnoseRequest(
        diagnosis=diagnose_request("PUNE-IN", "CNC-A-102", "Spindle overheating during the shift")
    ),
    "DiagnoseBatchRequest": lambda: copilot_pb2.DiagnoseBatchRequest(
        requests=[diagnose_request("PUNE-IN", "CNC-A-102", "Spindle overheating during the shift")]
    ),
    "GetIncidentRequest": lambda: copilot_pb2.GetIncidentRequest(request_id="r-1"),
    "ListIncidentsRequest": copilot_pb2.ListIncidentsRequest,
    "SubmitFeedbackRequest": lambda: copilot_pb2.SubmitFeedbackRequest(request_id="r-1"),
    "ListEquipmentRequest": copilot_pb2.ListEquipmentRequest,
}


def behaviours(field) -> set[int]:
    return set(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def test_required_fields_are_exactly_those_the_rules_refuse_when_empty():
    for name, valid in REQUESTS.items():
        message = valid()
        protovalidate.validate(message)  # the example is valid as it is
        for field in message.DESCRIPTOR.fields:
            emptied = valid()
            emptied.ClearField(field.name)
            try:
                protovalidate.validate(emptied)
                refused = False
            except protovalidate.ValidationError:
                refused = True
            required = field_behavior_pb2.REQUIRED in behaviours(field)
            assert required == refused, f"{name}.{field.name}: REQUIRED={required}, refused when empty={refused}"


def test_output_only_marks_server_set_fields_and_never_a_request_field():
    incident = copilot_pb2.Incident.DESCRIPTOR
    assert all(field_behavior_pb2.OUTPUT_ONLY in behaviours(f) for f in incident.fields)
    feedback = {f.name: behaviours(f) for f in copilot_pb2.Feedback.DESCRIPTOR.fields}
    assert (
        field_behavior_pb2.OUTPUT_ONLY in feedback["principal"]
        and field_behavior_pb2.OUTPUT_ONLY in feedback["submitted_at"]
    )
    for name in REQUESTS:
        for field in getattr(copilot_pb2, name).DESCRIPTOR.fields:
            assert field_behavior_pb2.OUTPUT_ONLY not in behaviours(field), f"{name}.{field.name}"
