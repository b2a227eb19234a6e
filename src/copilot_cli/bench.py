"""`copilot bench`: the benchmark suites (benchmarks/), each printing a table and writing JSON."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from copilot.runtime.config import data_dir
from copilot_cli.common import out


class Suite(StrEnum):
    mesh = "mesh"
    vision = "vision"
    retrieval = "retrieval"
    soak = "soak"
    vision_families = "vision-families"


def bench(
    suite: Annotated[
        Suite,
        typer.Option(
            "--suite",
            help="mesh: cold start + Diagnose latency, mesh vs in-process; vision: AnalyzeImage at 1/4/16 clients, "
            "batching off vs on; retrieval: p50/p99 at 1k/10k/100k chunks, ingest, embedding; soak: fixed rate "
            "while an agent is killed every minute; vision-families: detection and localisation on the held-out and tuning "
            "surface families (services/vision/eval/families.yaml), with 95 % intervals",
        ),
    ] = Suite.mesh,
    n: Annotated[int, typer.Option("--n", help="diagnoses (mesh) or images per run (vision) to time")] = 50,
    output: Annotated[
        Path | None, typer.Option("--output", help="JSON file (default <data dir>/bench/<suite>.json)")
    ] = None,
    sizes: Annotated[str, typer.Option("--sizes", help="retrieval: store sizes in chunks")] = "1000,10000,100000",
    duration: Annotated[float, typer.Option("--duration", help="soak: seconds of load")] = 600,
    rate: Annotated[float, typer.Option("--rate", help="soak: diagnoses per second (open loop)")] = 20,
    photo_share: Annotated[float, typer.Option("--photo-share", help="soak: share of diagnoses with a photo")] = 0.1,
    kill_every: Annotated[float, typer.Option("--kill-every", help="soak: seconds between agent kills (0: none)")] = 60,
) -> None:
    """Benchmarks: print a table and write JSON (never asserted in tests)."""
    target = output or data_dir() / "bench" / f"{suite.value}.json"
    if suite is Suite.soak:
        from benchmarks.soak import run_soak

        run_soak(
            output=target, console=out, duration_s=duration, rate=rate, photo_share=photo_share, kill_every_s=kill_every
        )
    elif suite is Suite.mesh:
        from benchmarks.mesh import run

        run(n=n, output=target, console=out)
    elif suite is Suite.vision_families:
        from services.vision.families import main as families

        families(["--output", str(target)])
    elif suite is Suite.vision:
        from benchmarks.mesh import run_vision

        run_vision(total=n, output=target, console=out)
    else:
        from benchmarks.retrieval import run_retrieval

        run_retrieval(queries=n, output=target, console=out, sizes=tuple(int(x) for x in sizes.split(",")))
