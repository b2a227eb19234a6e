"""Held-out evaluation of the vision engine on generated images (seeds never used by the starter set):
AUROC of good vs defect image scores, detection rate, and accuracy of the defect type of the strongest
region. `copilot eval --suite vision` prints it and writes JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from services.vision import samples

HELD_OUT_SEED = 1000


@dataclass
class VisionEval:
    images: int
    auroc: float
    detection_rate: float  # defect images with at least one region
    false_positive_rate: float  # good images with a defect
    type_accuracy: float  # strongest region's type == drawn defect, over detected defect images
    per_type_accuracy: dict[str, float] = field(default_factory=dict)
    confusions: list[tuple[str, str, str]] = field(default_factory=list)  # surface, truth, predicted

    def as_dict(self) -> dict:
        return asdict(self)


def auroc(labels: list[int], scores: list[float]) -> float:
    """Probability that a random defect image scores above a random good one (ties count half)."""
    pos = np.array([s for s, y in zip(scores, labels, strict=True) if y == 1])
    neg = np.array([s for s, y in zip(scores, labels, strict=True) if y == 0])
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def evaluate(engine, goods_per_surface: int = 10, per_defect: int = 5, equipment_type_known: bool = True) -> VisionEval:
    labels, scores = [], []
    detected = false_pos = correct = 0
    per_type: dict[str, list[int]] = {}
    confusions = []
    seed = HELD_OUT_SEED
    for surface in samples.SURFACES:
        kind = surface if equipment_type_known else ""
        for _ in range(goods_per_surface):
            seed += 1
            findings = engine.analyze(samples.to_bytes(samples.make_surface(surface, seed), "PNG"), kind)
            labels.append(0)
            scores.append(findings.anomaly_score)
            false_pos += bool(findings.defects)
        for defect in samples.DEFECTS:
            for _ in range(per_defect):
                seed += 1
                findings = engine.analyze(samples.to_bytes(samples.make_defect(surface, defect, seed), "PNG"), kind)
                labels.append(1)
                scores.append(findings.anomaly_score)
                if findings.defects:
                    detected += 1
                    hit = findings.defects[0].type == defect
                    correct += hit
                    per_type.setdefault(defect, []).append(int(hit))
                    if not hit:
                        confusions.append((surface, defect, findings.defects[0].type))
    n_defect = sum(labels)
    n_good = len(labels) - n_defect
    return VisionEval(
        images=len(labels),
        auroc=round(auroc(labels, scores), 4),
        detection_rate=round(detected / n_defect, 4),
        false_positive_rate=round(false_pos / n_good, 4),
        type_accuracy=round(correct / max(detected, 1), 4),
        per_type_accuracy={k: round(sum(v) / len(v), 4) for k, v in per_type.items()},
        confusions=confusions,
    )
