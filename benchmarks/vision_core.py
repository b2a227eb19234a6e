"""Vision model path in-process (no gRPC): the PatchCore provider exactly as the vision service runs it —
decode, the model path (backbone forward and the memory banks' nearest-neighbour search, one per image or one
per batch through the shared DynamicBatcher), regions and typing — at 1, 4 and 16 concurrent callers, batching
off and on, on a chosen device, with the banks where the backbone runs or (--banks cpu,cuda) compared between
two places, the backbone through ONNX Runtime or torch (--runtime; auto: ONNX on a CPU, torch on a GPU). Needs
torch, onnxruntime, numpy, scipy, pillow, pydantic-settings and the two EfficientNet packages, so it also runs on
the GPU machine:

    python benchmarks/vision_core.py --device cuda --banks cpu,cuda --images 192 --output vision-core-cuda.json

`copilot bench --suite vision` is the same measurement through a real vision process over gRPC (CPU)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
PHOTO = ROOT / "src" / "copilot_cli" / "samples" / "pump-housing-crack.jpg"

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
    parser.add_argument("--output", type=Path, default=data_dir() / "bench" / "vision-core.json")
    arguments = parser.parse_args()
    outcome = asyncio.run(main(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(outcome, indent=2))
    print(f"wrote {arguments.output}")
