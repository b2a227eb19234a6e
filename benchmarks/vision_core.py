"""Vision model path in-process (no gRPC): the PatchCore provider exactly as the vision service runs it —
decode, the model path (backbone forward and the memory banks' nearest-neighbour search, one per image or one
per batch through the shared DynamicBatcher), regions and typing — at 1, 4 and 16 concurrent callers, batching
off and on, on a chosen device, with the banks where the backbone runs or (--banks cpu,cuda) compared between
two places, the backbone through ONNX Runtime or torch (--runtime; auto: ONNX on a CPU, torch on a GPU). Needs
torch, onnxruntime, numpy, scipy, pillow, pydantic-settings and the two EfficientNet packages, so it also runs on
the GPU machine:

    python benchmarks/vision_core.py --device cuda --banks cpu,cuda --images 192 --output vision-core-cuda.json

`copilot bench --suite vision` is the same measurement through a real vision process over gRPC (CPU).

`--stages` measures instead the CPU each stage of one image costs, one image at a time, on three photos (the
sample crack and clean photos, 512 px, and a 12-megapixel camera-sized JPEG): decode and the backbone's input,
the exposure match, the backbone, the memory-bank search, the findings (regions, typing, the response), and
when a heatmap is asked for, the decode and findings with it. "Outside the backbone" is the first, second and
fifth: the per-image work around the model when no heatmap is asked for (the orchestrator never asks). `--stages --compare-code DIR` measures a second checkout's code (for instance
`git worktree add /tmp/before HEAD~3`) in the same run, alternately, and prints the ratios:

    python benchmarks/vision_core.py --stages --compare-code /tmp/before --output vision-stages.json"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
#: the code measured: this checkout, or another one (`--compare-code` runs this file again with it set)
ROOT = Path(os.environ.get("VISION_BENCH_CODE") or HERE)
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
PHOTO = HERE / "src" / "copilot_cli" / "samples" / "pump-housing-crack.jpg"
CLEAN_PHOTO = HERE / "src" / "copilot_cli" / "samples" / "pump-housing-clean.jpg"

from PIL import Image  # noqa: E402

from copilot.runtime.batching import DynamicBatcher  # noqa: E402
from copilot.runtime.config import data_dir  # noqa: E402
from services.vision.backbone import feature_extractor  # noqa: E402
from services.vision.core import VisionEngine  # noqa: E402
from services.vision.providers import PatchCoreProvider  # noqa: E402
from services.vision.references import ReferenceStore  # noqa: E402


def percentile(values: list[float], q: int) -> float:
    return round(statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1], 2)


def warmed_provider(engine: VisionEngine, args, batching: bool) -> PatchCoreProvider:
    """The provider as the vision service builds it, batching on or off, warmed for every batch size."""
    batcher = (
        DynamicBatcher(engine.measure, max_batch=args.max_batch, max_wait_s=args.max_wait_ms / 1000)
        if batching
        else None
    )
    provider = PatchCoreProvider(engine, batcher)
    provider.warm_up(Image.open(PHOTO).convert("RGB"), args.max_batch)
    return provider


async def load(provider: PatchCoreProvider, photo: bytes, clients: int, total: int, warm: bool = True) -> dict:
    times: list[float] = []

    async def run(count: int) -> None:
        remaining = [count]

        async def caller() -> None:
            while remaining[0] > 0:
                remaining[0] -= 1
                started = time.perf_counter()
                await provider.analyze(photo, "brushed-steel", False)
                times.append((time.perf_counter() - started) * 1000)

        await asyncio.gather(*(caller() for _ in range(clients)))

    if warm:
        await run(max(8, 2 * clients))  # warm at this concurrency: pool threads, batch shapes
    times.clear()
    began = time.perf_counter()
    await run(total)
    elapsed = time.perf_counter() - began
    return {
        "clients": clients,
        "images_per_s": round(total / elapsed, 2),
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
    }


async def main(args) -> dict:
    import torch

    photo = PHOTO.read_bytes()
    clients_levels = [int(c) for c in args.clients.split(",")]
    placements = args.banks.split(",") if args.banks else [args.device]
    with tempfile.TemporaryDirectory() as folder:
        extractor = feature_extractor(threads=args.threads or None, device=args.device, runtime=args.runtime)
        result = {
            "device": args.device,
            "device_name": torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "runtime": type(extractor).__name__,
            "threads": args.threads or len(os.sched_getaffinity(0)),
            "images_per_run": args.images,
            "max_batch": args.max_batch,
            "runs": [],
        }
        for banks in placements:  # the second placement reads the models the first one built from the cache
            engine = VisionEngine(extractor, ReferenceStore(Path(folder)), bank_device=banks)
            engine.seed_starter_set()
            engine.load()
            for batching in (False, True):
                provider = warmed_provider(engine, args, batching)
                for clients in clients_levels:
                    row = await load(provider, photo, clients, args.images)
                    result["runs"].append({"banks": banks, "batching": batching, **row})
                    print(
                        f"{args.device} banks on {banks:<6} batching={'on ' if batching else 'off'} "
                        f"clients={clients:2d} {row['images_per_s']:7.1f} images/s  p50 {row['p50_ms']:7.1f} ms  "
                        f"p99 {row['p99_ms']:7.1f} ms",
                        flush=True,
                    )
                await provider.close()
            if args.lone_caller_rounds:
                result.setdefault("lone_caller", []).append(await lone_caller(engine, args, photo, banks))
        if args.processes > 1:  # the processes read the models this one built from the store's cache
            levels = [c for c in clients_levels if c >= args.processes]
            result["processes_runs"] = several_processes(args, folder, levels)
    by = {(r["banks"], r["batching"], r["clients"]): r for r in result["runs"]}
    ratios = result["ratios"] = []
    for banks in placements:
        for clients in clients_levels:
            on, off = by[(banks, True, clients)], by[(banks, False, clients)]
            ratios.append(
                {
                    "compare": "batching on / off",
                    "banks": banks,
                    "clients": clients,
                    "throughput_ratio": round(on["images_per_s"] / off["images_per_s"], 2),
                    "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2),
                }
            )
    if len(placements) == 2:
        first, second = placements
        for batching in (False, True):
            for clients in clients_levels:
                a, b = by[(second, batching, clients)], by[(first, batching, clients)]
                ratios.append(
                    {
                        "compare": f"banks on {second} / on {first}",
                        "batching": batching,
                        "clients": clients,
                        "throughput_ratio": round(a["images_per_s"] / b["images_per_s"], 2),
                        "p99_ratio": round(a["p99_ms"] / b["p99_ms"], 2),
                    }
                )
    for row in result.get("processes_runs", []):
        one = by[(args.device, row["batching"], row["clients"])]
        ratios.append(
            {
                "compare": f"{args.processes} processes / 1",
                "batching": row["batching"],
                "clients": row["clients"],
                "throughput_ratio": round(row["images_per_s"] / one["images_per_s"], 2),
                "p99_ratio": round(row["p99_ms"] / one["p99_ms"], 2),
            }
        )
    for r in ratios:
        where = f"banks {r['banks']}" if "banks" in r else f"batching {'on' if r['batching'] else 'off'}"
        print(
            f"{r['compare']:<26} {where:<14} {r['clients']:2d} clients: {r['throughput_ratio']:.2f}x throughput, "
            f"p99 {r['p99_ratio']:.2f}x"
        )
    return result


async def lone_caller(engine: VisionEngine, args, photo: bytes, banks: str) -> dict:
    """One client, batching off and on alternately (`--lone-caller-rounds` rounds of `--images` each), so that both
    see the machine's same minutes: does batching cost a lone caller anything?"""
    providers = {batching: warmed_provider(engine, args, batching) for batching in (False, True)}
    p50: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.lone_caller_rounds):
        for batching, provider in providers.items():
            p50[batching].append((await load(provider, photo, 1, args.images))["p50_ms"])
    for provider in providers.values():
        await provider.close()
    off, on = statistics.median(p50[False]), statistics.median(p50[True])
    print(f"{args.device} banks on {banks:<6} one client, alternating: p50 {off:.1f} ms off, {on:.1f} ms on batching")
    return {
        "banks": banks,
        "rounds": args.lone_caller_rounds,
        "p50_ms_off": p50[False],
        "p50_ms_on": p50[True],
        "median_p50_ms_off": round(off, 2),
        "median_p50_ms_on": round(on, 2),
        "p50_ratio_on_off": round(on / off, 3),
    }


def _process(args, folder: str, batching: bool, clients: int, total: int, barrier, results) -> None:
    """One of several vision processes on one device (what several replicas per GPU would be): its own engine on
    the shared store (models read from the cache), warmed, then measured in step with the others."""

    async def go() -> dict:
        threads = max(1, len(os.sched_getaffinity(0)) // args.processes)
        extractor = feature_extractor(threads=threads, device=args.device, runtime=args.runtime)
        engine = VisionEngine(extractor, ReferenceStore(Path(folder)))
        engine.load()
        provider = warmed_provider(engine, args, batching)
        photo = PHOTO.read_bytes()
        await load(provider, photo, clients, max(8, 2 * clients), warm=False)
        barrier.wait()
        row = await load(provider, photo, clients, total, warm=False)
        await provider.close()
        return row

    try:
        results.put(asyncio.run(go()))
    except Exception as exc:  # the parent reports it
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        with contextlib.suppress(Exception):
            barrier.abort()


# --- the CPU of each stage, one image at a time ------------------------------------------------------------------

#: the stages outside the backbone and the bank search: the per-image Python work around the model
OUTSIDE = ("prepare", "exposure", "findings")


def _photos() -> dict[str, bytes]:
    """The three photos the stages are measured on: the two 512 px samples and the crack photo as a 12-megapixel
    camera would send it (4000x3000, JPEG quality 90)."""
    import io

    camera = io.BytesIO()
    Image.open(PHOTO).convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC).save(camera, "JPEG", quality=90)
    return {
        "crack 512 px": PHOTO.read_bytes(),
        "clean 512 px": CLEAN_PHOTO.read_bytes(),
        "crack 12 MP": camera.getvalue(),
    }


def stage_costs(repeats: int) -> dict:
    """Per photo and stage, the thread CPU and wall time per image (medians over `repeats` rounds), on one thread:
    each stage runs on the calling thread except the backbone's intra-op threads (its wall time is the figure)."""
    with tempfile.TemporaryDirectory() as folder:
        extractor = feature_extractor(threads=1)
        engine = VisionEngine(extractor, ReferenceStore(Path(folder)))
        engine.seed_starter_set()
        engine.load()
        model = engine.reference_sets()["brushed-steel"]
        rows: dict[str, dict[str, dict[str, float]]] = {}
        # a heatmap asked for: the photo decoded again for display (older code: its one decode was at that scale)
        takes_display = "display" in inspect.signature(engine.prepare).parameters
        prepare_for_heatmap = (lambda data: engine.prepare(data, True)) if takes_display else engine.prepare
        for name, data in _photos().items():
            image, pixels = engine.prepare(data)
            display, _ = prepare_for_heatmap(data)
            exposed = engine._exposed(pixels, model)
            maps = extractor.features([exposed])
            measured = engine.measure([(pixels, "brushed-steel")])[0]
            stages: dict[str, Callable[[], object]] = {
                "prepare": partial(engine.prepare, data),
                "exposure": partial(engine._exposed, pixels, model),
                "backbone": partial(extractor.features, [exposed]),
                "banks": partial(model.bank.batch_scores, maps),
                "findings": partial(engine.score, image, measured, "brushed-steel", False),
                "prepare for a heatmap": partial(prepare_for_heatmap, data),
                "findings + heatmap": partial(engine.score, display, measured, "brushed-steel", True),
            }
            samples: dict[str, list[tuple[float, float]]] = {stage: [] for stage in stages}
            for _ in range(repeats):
                for stage, run in stages.items():
                    cpu, wall = time.thread_time(), time.perf_counter()
                    run()
                    samples[stage].append(((time.thread_time() - cpu) * 1000, (time.perf_counter() - wall) * 1000))
            rows[name] = {
                stage: {
                    "cpu_ms": round(statistics.median(c for c, _ in values), 3),
                    "wall_ms": round(statistics.median(w for _, w in values), 3),
                }
                for stage, values in samples.items()
            }
            rows[name]["outside the backbone"] = {
                key: round(sum(rows[name][stage][key] for stage in OUTSIDE), 3) for key in ("cpu_ms", "wall_ms")
            }
    return {"code": str(ROOT), "photos": rows}


def _stage_costs_of(code: Path, repeats: int) -> dict:
    """`stage_costs` of another checkout's code, in a fresh interpreter."""
    import subprocess

    env = {**os.environ, "VISION_BENCH_CODE": str(code.resolve())}
    out = subprocess.run(
        [sys.executable, __file__, "--stages-json", "--repeats", str(repeats)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def stages_main(args) -> dict:
    """`--stages`: this code's stage costs, and with --compare-code the other code's, alternately (rounds of
    `repeats`, `args.rounds` times each), so both see the machine's same hours."""
    runs: dict[str, list[dict]] = {"this": [], "compared": []}
    for _ in range(args.rounds):
        runs["this"].append(_stage_costs_of(ROOT, args.repeats))
        if args.compare_code:
            runs["compared"].append(_stage_costs_of(args.compare_code, args.repeats))

    def median_of(results: list[dict]) -> dict:
        first = results[0]["photos"]
        return {
            photo: {
                stage: {
                    key: round(statistics.median(r["photos"][photo][stage][key] for r in results), 3)
                    for key in ("cpu_ms", "wall_ms")
                }
                for stage in first[photo]
            }
            for photo in first
        }

    result: dict = {"this": {"code": str(ROOT), "photos": median_of(runs["this"])}, "rounds": args.rounds}
    stages = list(next(iter(result["this"]["photos"].values())))
    header = f"{'photo':<14} {'stage':<22} {'this (ms CPU)':>14}"
    if args.compare_code:
        result["compared"] = {"code": str(args.compare_code), "photos": median_of(runs["compared"])}
        header += f" {'compared':>10} {'compared / this':>16}"
        result["ratios"] = {
            photo: {
                stage: round(
                    result["compared"]["photos"][photo][stage]["cpu_ms"]
                    / max(result["this"]["photos"][photo][stage]["cpu_ms"], 1e-3),
                    2,
                )
                for stage in stages
            }
            for photo in result["this"]["photos"]
        }
    print(header)
    for photo, by_stage in result["this"]["photos"].items():
        for stage in stages:
            line = f"{photo:<14} {stage:<22} {by_stage[stage]['cpu_ms']:>14.2f}"
            if args.compare_code:
                line += (
                    f" {result['compared']['photos'][photo][stage]['cpu_ms']:>10.2f}"
                    f" {result['ratios'][photo][stage]:>15.2f}x"
                )
            print(line)
    return result


def several_processes(args, folder: str, clients_levels: list[int]) -> list[dict]:
    """The same load spread over `args.processes` processes on one device: images/s summed over them."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    rows = []
    for batching in (False, True):
        for clients in clients_levels:
            per_process = max(1, clients // args.processes)
            barrier, results = context.Barrier(args.processes), context.Queue()
            workers = [
                context.Process(
                    target=_process,
                    args=(args, folder, batching, per_process, args.images // args.processes, barrier, results),
                )
                for _ in range(args.processes)
            ]
            for worker in workers:
                worker.start()
            outcomes = [results.get(timeout=600) for _ in workers]
            for worker in workers:
                worker.join(timeout=60)
            failed = [o["error"] for o in outcomes if "error" in o]
            if failed:
                raise RuntimeError(f"a vision process failed: {failed}")
            row = {
                "processes": args.processes,
                "banks": args.device,
                "batching": batching,
                "clients": per_process * args.processes,
                "images_per_s": round(sum(o["images_per_s"] for o in outcomes), 2),
                "p50_ms": round(statistics.median(o["p50_ms"] for o in outcomes), 2),
                "p99_ms": max(o["p99_ms"] for o in outcomes),
            }
            rows.append(row)
            print(
                f"{args.device} {args.processes} processes batching={'on ' if batching else 'off'} "
                f"clients={row['clients']:2d} {row['images_per_s']:7.1f} images/s  p50 {row['p50_ms']:7.1f} ms  "
                f"p99 {row['p99_ms']:7.1f} ms",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"], help="the backbone's runtime")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        help="also measure the load spread over this many vision processes on the device (banks there too)",
    )
    parser.add_argument(
        "--banks",
        default="",
        help="where the memory banks are scored, comma-separated to compare two (e.g. cpu,cuda); default: --device",
    )
    parser.add_argument(
        "--lone-caller-rounds",
        type=int,
        default=0,
        help="also measure one client with batching off and on alternately, this many rounds of --images each",
    )
    parser.add_argument(
        "--stages", action="store_true", help="the CPU of each stage of one image instead of the load (see above)"
    )
    parser.add_argument("--compare-code", type=Path, help="with --stages: another checkout's code, measured alike")
    parser.add_argument("--repeats", type=int, default=30, help="with --stages: images per photo and round")
    parser.add_argument("--rounds", type=int, default=3, help="with --stages: rounds per code, alternating")
    parser.add_argument("--stages-json", action="store_true", help=argparse.SUPPRESS)  # one round, JSON on stdout
    parser.add_argument("--output", type=Path, default=data_dir() / "bench" / "vision-core.json")
    arguments = parser.parse_args()
    if arguments.stages_json:
        print(json.dumps(stage_costs(arguments.repeats)))
        sys.exit(0)
    outcome = stages_main(arguments) if arguments.stages else asyncio.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(outcome, indent=2))
    print(f"wrote {arguments.output}")
