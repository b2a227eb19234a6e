"""The similar-incident lookup as the history grows: the word index against the scan it replaced.

    python -m benchmarks.history [--sizes 1000 10000 100000] [--out .copilot-data/bench/history.json]

One SQLite history per size (the default store), every incident on the same equipment (the worst case for a
lookup that is per equipment), descriptions drawn from a vocabulary of 400 maintenance words. For each size:
`IncidentStore.similar` (the index: newest `per_word` postings of each word) and the scan it replaced (the newest
200 incidents of the equipment, words compared in Python), p50/p99 over 200 lookups, and how many of the scan's
answers the index also finds; plus `save` (incident + its index rows). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import insert, select

from copilot.runtime.config import data_dir
from copilot.text import content_words
from services.orchestrator.history import IncidentRow, IncidentStore, IncidentWordRow, StoredIncident

PLANT, EQUIPMENT = "PUNE-IN", "CNC-A-102"


def _vocabulary(rng: random.Random) -> list[str]:
    stems = ["spindle", "coolant", "bearing", "hydraulic", "pressure", "valve", "motor", "belt", "weld", "torch"]
    stems += ["sensor", "alarm", "vibration", "noise", "leak", "overheating", "drift", "axis", "servo", "pump"]
    return stems + [f"{rng.choice(stems)}{n}" for n in range(380)]


def _incident(n: int, rng: random.Random, words: list[str], start: datetime) -> StoredIncident:
    problem = " ".join(rng.choices(words[:20], k=3) + rng.choices(words, k=5))
    return StoredIncident(
        request_id=f"r-{n:07d}",
        created_at=start + timedelta(seconds=n),
        plant_id=PLANT,
        equipment_id=EQUIPMENT,
        equipment_type="",
        problem_description=problem,
        image_sha256="",
        image_mime_type="",
        principal="bench",
        trace_id="",
        confidence=0.7,
        requires_manual_review=False,
        referenced_sop_ids=("SOP-123",),
        response=b"",
        input_fingerprint=f"{n}",
        stages=(),
    )


def _fill(store: IncidentStore, size: int, rng: random.Random, words: list[str]) -> None:
    start = datetime.now(UTC) - timedelta(days=400)
    with store.engine.begin() as connection:
        for first in range(0, size, 5000):
            batch = [_incident(n, rng, words, start) for n in range(first, min(size, first + 5000))]
            rows = [IncidentRow.of(i) for i in batch]
            connection.execute(
                insert(IncidentRow), [{c.key: getattr(r, c.key) for c in IncidentRow.__table__.columns} for r in rows]
            )
            postings = [p for i in batch for p in IncidentWordRow.of(i)]
            connection.execute(
                insert(IncidentWordRow),
                [{c.key: getattr(p, c.key) for c in IncidentWordRow.__table__.columns} for p in postings],
            )


def _scan(store: IncidentStore, problem: str, limit: int = 3, scan: int = 200) -> list[str]:
    """The lookup before the index: the newest `scan` incidents of the equipment, words compared in Python."""
    words = content_words(problem)
    query = (
        select(IncidentRow.request_id, IncidentRow.created_at, IncidentRow.problem_description)
        .where(IncidentRow.plant_id == PLANT, IncidentRow.equipment_id == EQUIPMENT)
        .order_by(IncidentRow.created_at.desc(), IncidentRow.request_id.desc())
        .limit(scan)
    )
    scored = []
    with store.engine.connect() as connection:
        for request_id, created_at, other_problem in connection.execute(query):
            other = content_words(other_problem)
            overlap = len(words & other) / len(words | other) if other else 0.0
            if overlap >= 0.2:
                scored.append((-overlap, -created_at.timestamp(), request_id))
    return [r[2] for r in sorted(scored)[:limit]]


def _indexed(store: IncidentStore, problem: str) -> list[str]:
    return [p.request_id for p in store.similar(PLANT, EQUIPMENT, problem)]


def _timed(call, questions: list[str]) -> tuple[list[float], list]:
    times, answers = [], []
    for question in questions:
        started = time.perf_counter()
        answers.append(call(question))
        times.append((time.perf_counter() - started) * 1000)
    return times, answers


def _p(times: list[float], q: float) -> float:
    return round(statistics.quantiles(times, n=100)[int(q) - 1], 3)


def run(sizes: list[int], lookups: int = 200) -> list[dict]:
    rng = random.Random(7)
    words = _vocabulary(rng)
    results = []
    for size in sizes:
        with tempfile.TemporaryDirectory() as folder:
            store = IncidentStore(f"sqlite:///{Path(folder) / 'incidents.db'}")
            try:
                _fill(store, size, rng, words)
                questions = [_incident(0, rng, words, datetime.now(UTC)).problem_description for _ in range(lookups)]
                index_times, index_answers = _timed(partial(_indexed, store), questions)
                scan_times, scan_answers = _timed(partial(_scan, store), questions)
                save_times = []
                for n in range(100):
                    incident = _incident(size + n, rng, words, datetime.now(UTC))
                    started = time.perf_counter()
                    store.save(incident)
                    save_times.append((time.perf_counter() - started) * 1000)
                found = sum(len(set(s) & set(i)) for s, i in zip(scan_answers, index_answers, strict=True))
                wanted = sum(len(s) for s in scan_answers)
                results.append(
                    {
                        "incidents": size,
                        "index_p50_ms": _p(index_times, 50),
                        "index_p99_ms": _p(index_times, 99),
                        "scan_p50_ms": _p(scan_times, 50),
                        "scan_p99_ms": _p(scan_times, 99),
                        "scan_answers_also_found": round(found / wanted, 3) if wanted else None,
                        "index_answers_per_lookup": round(sum(map(len, index_answers)) / lookups, 2),
                        "save_p50_ms": _p(save_times, 50),
                        "save_p99_ms": _p(save_times, 99),
                    }
                )
            finally:
                store.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = run(args.sizes)
    table = Table(*results[0], title="similar incidents: word index vs newest-200 scan (SQLite, one equipment)")
    for row in results:
        table.add_row(*(str(v) for v in row.values()))
    Console().print(table)
    out = args.out or data_dir() / "bench" / "history.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"suite": "history", "results": results}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
