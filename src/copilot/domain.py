"""Domain types shared by the agent cores.

Cores speak these plain dataclasses and never import gRPC; `copilot.runtime.convert` maps them to and
from the generated protobuf messages at the service edge.

Names: a document of the knowledge library has a `document_id` (ListDocuments, ingest, the store). Where the
report format and the citation contract speak of the same id they call it `sop_id` (SopCitation.sop_id,
GuidanceStep.sop_ids, IncidentReport.referenced_sop_ids, and SopChunk, a retrieved passage as it is cited);
it is always the cited document's `document_id`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

#: The manual-review rule: a diagnosis whose merged confidence is below this goes to manual review.
MANUAL_REVIEW_THRESHOLD = 0.5


def utc_now() -> datetime:
    """Every stored or reported time is an aware UTC datetime."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """An aware datetime converted to UTC; a naive one is taken as UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class DefectType(enum.StrEnum):
    """The defect types the shipped models, prompts and report rules know (kebab-case on the wire). A plant
    can register reference images under a label of its own; that label is then a defect type too."""

    CRACK = "crack"
    SCRATCH = "scratch"
    CORROSION = "corrosion"
    DENT = "dent"
    CONTAMINATION = "contamination"
    COATING_DEFECT = "coating-defect"
    WELD_POROSITY = "weld-porosity"
    #: Off the good references but like no labelled defect (PatchCore).
    ANOMALY = "anomaly"
    #: A hosted model's answer that names no known type.
    OTHER = "other"


@dataclass(frozen=True)
class BoundingBox:
    """Normalised (0..1) box, origin top-left."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class Defect:
    """A defect vision found: its type, confidence and where it is."""

    type: str
    confidence: float
    description: str = ""
    box: BoundingBox | None = None

    @property
    def label(self) -> str:
        return self.type.replace("-", " ")


@dataclass(frozen=True)
class AnomalyMap:
    """The raw anomaly map: one value per image patch, row-major, `width` x `height` cells laid evenly over the
    whole image. A value is the patch's anomaly divided by the reference set's decision threshold, so 1.0 is
    the threshold whatever the model or reference set."""

    width: int
    height: int
    values: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.values) != self.width * self.height:
            raise ValueError(f"{len(self.values)} values for a {self.width}x{self.height} map")


@dataclass(frozen=True)
class ReferenceCalibration:
    """How a reference set's threshold was set from its own good references (each scored when held out of the
    bank); scores in multiples of the threshold."""

    good_references: int
    #: False: too few good references to calibrate on, so the threshold is a rough guess
    calibrated: bool
    largest_good_score: float
    median_good_score: float


@dataclass(frozen=True)
class VisionFindings:
    """What vision says about one photo."""

    defects: tuple[Defect, ...]
    confidence: float
    anomaly_score: float
    description: str
    model: str
    width: int = 0
    height: int = 0
    heatmap_png: bytes = b""
    reference_set: str = ""
    #: True when the equipment type has no references of its own and the generic set (every type's good
    #: references) was used: defects are then only guesses and carry a low confidence.
    generic: bool = False
    anomaly_map: AnomalyMap | None = None
    calibration: ReferenceCalibration | None = None


@dataclass(frozen=True)
class SopChunk:
    """A retrieved piece of an SOP, with its score."""

    chunk_id: str
    sop_id: str
    title: str
    section: str
    text: str
    score: float
    version: str = ""
    position: int = 0
    #: The machine types the chunk's document is written for; empty = every type (safety, lubrication, LOTO).
    equipment_types: tuple[str, ...] = ()


@dataclass(frozen=True)
class SopCitation:
    """An SOP an answer cites: id, title, section and how well it matched."""

    sop_id: str
    title: str
    section: str
    score: float
    version: str = ""
    equipment_types: tuple[str, ...] = ()  # of the cited document; empty = written for every type


@dataclass(frozen=True)
class GuidanceStep:
    """One step of guidance with the SOPs and sections it follows."""

    text: str
    sop_ids: tuple[str, ...] = ()
    sections: tuple[str, ...] = ()
    unsupported: bool = False  # no retrieved document backs it


class ReviewKind(enum.Enum):
    """Why guidance must not be followed without a person's review, whatever its retrieval score."""

    #: The request's machine type is known and no SOP in scope is written for it.
    EQUIPMENT_NOT_COVERED = "equipment_not_covered"
    #: The SOPs the steps come from are written for another machine than the request's.
    EQUIPMENT_MISMATCH = "equipment_mismatch"
    #: The problem is described in a language the SOP library and its search do not serve.
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    #: Nothing says which machine this is, and the best match is not strong enough to trust without one.
    UNKNOWN_EQUIPMENT_WEAK_MATCH = "unknown_equipment_weak_match"


@dataclass(frozen=True)
class GuidanceReview:
    """Why guidance needs a human look, of one kind."""

    kind: ReviewKind
    message: str  # one sentence for the reviewer, naming what was found and what was asked


@dataclass(frozen=True)
class Guidance:
    """The knowledge agent's answer: cited steps, safety notes, confidence and reviews."""

    steps: tuple[GuidanceStep, ...]
    citations: tuple[SopCitation, ...]
    safety_notes: tuple[str, ...]
    confidence: float
    fallback: bool
    query: str
    generator: str = "extractive"
    model: str = ""
    citations_removed: int = 0
    unsupported_steps: int = 0
    cached: bool = False
    #: The machine type the guidance was scoped to ("" = unknown) and where it came from: "request" (the caller
    #: or the equipment registry), "equipment-id" (a word of the id, e.g. PUMP-A-7) or "description".
    equipment_type: str = ""
    equipment_source: str = ""
    #: ISO 639-1 code of the problem description's language ("" = too short to tell).
    language: str = ""
    #: Reasons this guidance needs a person's review; any one sends the diagnosis to manual review.
    reviews: tuple[GuidanceReview, ...] = ()


@dataclass(frozen=True)
class RecommendedAction:
    """A report's recommended action with the SOPs behind it."""

    description: str
    sop_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class IncidentReport:
    """The incident report: its sections, the SOPs it references and the rendered text."""

    summary: str
    defects: tuple[Defect, ...]
    recommended_actions: tuple[RecommendedAction, ...]
    safety_notes: tuple[str, ...]
    follow_up: tuple[str, ...]
    referenced_sop_ids: tuple[str, ...]
    generated_at: datetime
    rendered_text: str
    citations: tuple[SopCitation, ...] = ()
    #: When the diagnosis goes to manual review: the closest SOP steps, for the reviewer, never as actions.
    review_steps: tuple[RecommendedAction, ...] = ()
    #: Why it goes to manual review, one sentence each.
    review_notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class ReportInputs:
    """Everything the report agent composes from."""

    request_id: str
    plant_id: str
    equipment_id: str
    problem_description: str
    defects: tuple[Defect, ...] = ()
    guidance: tuple[GuidanceStep, ...] = ()
    citations: tuple[SopCitation, ...] = ()
    safety_notes: tuple[str, ...] = ()
    confidence_score: float = 0.0
    requires_manual_review: bool = False
    stage_notes: tuple[str, ...] = ()
    image_analyzed: bool = False
    related_incidents: tuple[PastIncident, ...] = ()
    vision_summary: str = ""
    vision_confidence: float = 0.0
    #: Why the diagnosis goes to manual review (besides a low confidence), one sentence each.
    review_notes: tuple[str, ...] = ()
    #: The machine type the diagnosis was made for ("" = unknown).
    equipment_type: str = ""


@dataclass(frozen=True)
class PastIncident:
    """An earlier diagnosis of the same equipment, cited in the report's follow-up."""

    request_id: str
    created_at: datetime
    problem_description: str
    referenced_sop_ids: tuple[str, ...] = ()
    resolution_notes: str = ""  # from the technician's feedback, when there is some


class EscalationReason(enum.Enum):
    """Why a diagnosis needs (or deserves) a human look; most serious first."""

    STAGE_DEGRADED = "stage_degraded"
    LOW_CONFIDENCE = "low_confidence"
    NO_SUPPORTING_SOP = "no_supporting_sop"
    LOW_VISION_CONFIDENCE = "low_vision_confidence"
    UNSUPPORTED_GUIDANCE = "unsupported_guidance"
    EQUIPMENT_NOT_COVERED = "equipment_not_covered"
    EQUIPMENT_MISMATCH = "equipment_mismatch"
    UNSUPPORTED_LANGUAGE = "unsupported_language"
    UNKNOWN_EQUIPMENT_WEAK_MATCH = "unknown_equipment_weak_match"


class Stage(enum.Enum):
    """The diagnosis stages, in the order they run."""

    VISION = "vision"
    KNOWLEDGE = "knowledge"
    REPORT = "report"


class StageState(enum.Enum):
    """How a stage ended."""

    OK = "ok"
    DEGRADED = "degraded"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class StageStatus:
    """How one stage went: its state, error, confidence and duration."""

    stage: Stage
    state: StageState
    error: str = ""
    confidence: float | None = None
    duration_ms: float = 0.0


@dataclass(frozen=True)
class StageStarted:
    """A diagnosis stage began (streamed to StreamDiagnose callers)."""

    request_id: str
    stage: Stage


@dataclass(frozen=True)
class StageFinished:
    """A diagnosis stage ended; `result` is its partial result (None when it degraded)."""

    request_id: str
    status: StageStatus
    result: VisionFindings | Guidance | IncidentReport | None


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field, reported as google.rpc.BadRequest.FieldViolation."""

    field: str
    description: str


@dataclass
class DiagnosisInput:
    """A diagnosis request in domain terms: plant, equipment, problem and optional photo."""

    plant_id: str
    equipment_id: str
    problem_description: str
    image_data: bytes = b""
    image_mime_type: str = ""
    image_id: str = ""
    #: The machine type SOPs are chosen for (pump, chiller, cnc-lathe); empty: the equipment registry's.
    equipment_type: str = ""
    #: The vision reference set the photo is compared with (brushed-steel); empty: the equipment registry's.
    reference_set: str = ""


@dataclass(frozen=True)
class VisionRequest:
    """What the vision agent is asked: one photo of one machine, judged against a reference set."""

    image_data: bytes
    image_mime_type: str
    equipment_id: str
    #: The reference set the photo is compared with (the machine type's good parts).
    reference_set: str
    image_id: str = ""


@dataclass(frozen=True)
class AdviceRequest:
    """What the knowledge agent is asked: guidance for one problem on one machine, at one plant."""

    problem_description: str
    plant_id: str
    equipment_id: str
    #: The machine type the SOPs must be written for ("" = the knowledge agent infers it).
    equipment_type: str = ""
    #: What vision found on the photo, when it ran first.
    defects: tuple[Defect, ...] = ()


@dataclass
class Diagnosis:
    """The workflow's answer: the report, the merged confidence and whether a human must review it."""

    request_id: str
    report: IncidentReport
    confidence_score: float
    requires_manual_review: bool
    stages: list[StageStatus] = field(default_factory=list)
    safety_disclaimer: str = ""
    escalation_reasons: tuple[EscalationReason, ...] = ()
    trace_id: str = ""
    #: Why the diagnosis goes to manual review, one sentence each (empty when it does not).
    review_notes: tuple[str, ...] = ()
    #: What the equipment was taken to be: its machine type and the vision reference set used.
    equipment_type: str = ""
    reference_set: str = ""
