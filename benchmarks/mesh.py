"""`copilot bench`: cold start of the mesh and diagnosis latency, through the mesh and with the same
agent cores called in-process, measured in one run so the ratio is meaningful on a noisy machine."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import secrets
import statistics
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from rich.console import Console
from rich.table import Table

from copilot.client import CHANNEL_OPTIONS, auth_metadata, diagnose_request
from copilot.domain import AdviceRequest, Guidance, IncidentReport, ReportInputs, VisionFindings, VisionRequest
from copilot.runtime import convert
from copilot.runtime.auth import END_USER_HEADER, Role, mint_token
from copilot.v1 import copilot_pb2_grpc
from copilot_cli.diagnose import sample_photo
from copilot_cli.launcher import Mesh

PROBLEMS = [
    "CNC machine overheating during operation",
    "Spot welder producing porous welds with spatter",
    "Paint peeling from housings after the curing oven",
    "Bolts on the assembly station keep coming loose",
    "Spindle vibration and chatter marks on parts",
]
SAMPLE = sample_photo()
#: the HS256 secret of the vision process the vision suite starts (its tokens are minted here)
BENCH_SECRET = secrets.token_urlsafe(48)


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "n": len(ordered),
        "p50_ms": round(q[49], 2),
        "p90_ms": round(q[89], 2),
        "p99_ms": round(q[98], 2),
        "mean_ms": round(statistics.fmean(ordered), 2),
        "max_ms": round(ordered[-1], 2),
    }


class InProcessAgents:
    """The same agent cores the services wrap, called directly (no gRPC, no processes)."""

    def __init__(self, store: Path) -> None:
        from services.rag.core import KnowledgeBase, open_store
        from services.rag.corpus import starter_corpus
        from services.rag.embedders import minilm_embedder
        from services.vision.backbone import feature_extractor
        from services.vision.core import VisionEngine
        from services.vision.references import ReferenceStore

        # one intra-op thread, as the vision service runs its backbone without batching (VISION_THREADS=0)
        self.vision = VisionEngine(feature_extractor(threads=1), ReferenceStore(store / "vision"))
        self.vision.seed_starter_set()
        self.vision.load()
        self.knowledge = KnowledgeBase(open_store(store), minilm_embedder())
        self.knowledge.ensure_documents(starter_corpus())

    async def analyze_image(self, request: VisionRequest, *, timeout: float) -> VisionFindings:
        return self.vision.analyze(request.image_data, request.reference_set)

    async def advise(self, request: AdviceRequest, *, timeout: float) -> Guidance:
        return self.knowledge.advise(
            request.problem_description,
            request.defects,
            equipment_type=request.equipment_type,
            plant_id=request.plant_id,
            equipment_id=request.equipment_id,
        )

    async def compose_report(self, inputs: ReportInputs, *, timeout: float) -> IncidentReport:
        from copilot.reporting import compose_report

        return compose_report(inputs)

    async def close(self) -> None:
        return None


def _time_mesh(address: str, n: int, image: bytes | None) -> list[float]:
    times = []
    with grpc.insecure_channel(address) as channel:
        stub = copilot_pb2_grpc.CopilotServiceStub(channel)
        for i in range(n + 3):
            request = diagnose_request("PUNE-IN", "CNC-A-102", PROBLEMS[i % len(PROBLEMS)], image)
            started = time.perf_counter()
            stub.Diagnose(request, metadata=auth_metadata("technician-bench"), timeout=60)
            if i >= 3:  # the first calls open connections
                times.append((time.perf_counter() - started) * 1000)
    return times


def _time_in_process(agents: InProcessAgents, history_dir: Path, n: int, image: bytes | None) -> list[float]:
    """The orchestrator's own diagnosis path (recorder, workflow, similar-incident lookup, incident stored before
    the answer) over the agent cores called in-process: the same work as a Diagnose through the mesh, history
    included in both, without processes, gRPC, auth, validation or interceptors."""
    from services.orchestrator.history import IncidentStore
    from services.orchestrator.recorder import DiagnosisRecorder
    from services.orchestrator.server import related_incidents
    from services.orchestrator.workflow import DiagnosisWorkflow

    history = IncidentStore(f"sqlite:///{history_dir / 'incidents.db'}")
    recorder = DiagnosisRecorder(
        DiagnosisWorkflow(agents, related_incidents=related_incidents(history, 3)),
        history,
        encode=convert.diagnosis_to_bytes,
    )

    async def go() -> list[float]:
        times = []
        for i in range(n + 3):
            request = diagnose_request("PUNE-IN", "CNC-A-102", PROBLEMS[i % len(PROBLEMS)], image)
            started = time.perf_counter()
            await recorder.diagnose(
                convert.diagnosis_input_from_pb(request), request.request_id, None, "technician-bench"
            )
            if i >= 3:
                times.append((time.perf_counter() - started) * 1000)
        return times

    try:
        return asyncio.run(go())
    finally:
        history.close()


class TraceSink:
    """A minimal OTLP/gRPC trace receiver in this process (what Jaeger's collector is to the mesh): keeps
    (service, span name, trace id, start, end) of every exported span."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

        from copilot_cli.launcher import free_port

        self.spans: list[tuple[str, str, bytes, int, int]] = []
        sink = self

        class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource_spans in request.resource_spans:
                    service = next(
                        (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                        "",
                    )
                    for scope in resource_spans.scope_spans:
                        sink.spans.extend(
                            (service, span.name, span.trace_id, span.start_time_unix_nano, span.end_time_unix_nano)
                            for span in scope.spans
                        )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Receiver(), self.server)
        self.port = free_port()
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()

    @property
    def env(self) -> dict[str, str]:
        return {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_TRACES_INSECURE": "true",
        }

    def stop(self) -> None:
        self.server.stop(None)


def hop_breakdown(spans: Sequence[tuple[str, str, bytes, int, int]]) -> dict[str, float]:
    """p50 ms of where a text Diagnose's time goes, from its trace: per agent call, the orchestrator's client span
    minus the agent's server span (both gRPC stacks and the wire) and the agent's server span minus its core span
    (its interceptors); the orchestrator's own time (its server span minus its calls to agents)."""
    by_trace: dict[bytes, dict[tuple[str, str], int]] = {}
    for service, name, trace_id, start, end in spans:
        by_trace.setdefault(trace_id, {})[(service.removeprefix("copilot-"), name)] = end - start
    parts: dict[str, list[float]] = {}
    calls = {
        "knowledge": ("/copilot.agents.v1.KnowledgeService/Advise", "knowledge.advise"),
        "report": ("/copilot.agents.v1.ReportService/ComposeReport", "report.compose"),
    }
    for durations in by_trace.values():
        edge = durations.get(("orchestrator", "/copilot.v1.CopilotService/Diagnose"))
        needed = [(side, rpc) for agent, (rpc, _) in calls.items() for side in (agent, "orchestrator")]
        if edge is None or any(key not in durations for key in needed):
            continue
        parts.setdefault("orchestrator_server_span", []).append(edge)
        own = edge
        for agent, (rpc, core) in calls.items():
            client, server = durations[("orchestrator", rpc)], durations[(agent, rpc)]
            own -= client
            parts.setdefault(f"{agent}_core", []).append(durations.get((agent, core), server))
            parts.setdefault(f"{agent}_interceptors", []).append(server - durations.get((agent, core), server))
            parts.setdefault(f"{agent}_grpc_and_wire", []).append(client - server)
        parts.setdefault("orchestrator_own", []).append(own)
    return {k: round(statistics.median(v) / 1e6, 2) for k, v in parts.items()} | {
        "traces": len(parts.get("orchestrator_own", []))
    }


#: the order of the tracing runs: exported (A) and not (B) as A B B A, so that a machine whose speed drifts during
#: the runs (this one's moves by tens of per cent within minutes) weighs both sides alike
TRACING_ORDER = ("exported", "not_exported", "not_exported", "exported")


def _tracing_cost(mesh: Mesh, n: int, console: Console) -> dict:
    """Text throughput at 8 clients with every span exported over OTLP (to a receiver in this process, on the
    same cores) against the default (spans made, not exported), in TRACING_ORDER; the ratio is of the diagnoses/s
    summed over each side's runs, and of the services' CPU per diagnosis. The trace-derived hop breakdown of
    single calls comes from the first exported run."""
    sink = TraceSink()
    names = ["orchestrator", "knowledge", "report"]
    result: dict = {"order": list(TRACING_ORDER), "runs": []}
    try:
        for round_, label in enumerate(TRACING_ORDER):
            env = sink.env if label == "exported" else {}
            for name in names:
                proc = mesh.services[name]
                for key in sink.env:
                    proc.env.pop(key, None)
                proc.env.update(env)
                mesh.restart(name)
            mesh.wait_ready(names=names)
            address = mesh.address("orchestrator")
            with console.status(f"tracing {label} ({round_ + 1} of {len(TRACING_ORDER)}): throughput at 8 clients…"):
                _time_mesh(address, 10, None)
                pids = {name: mesh.services[name].handle.pid for name in names}
                result["runs"].append({"label": label} | _throughput(address, 8, max(4 * n, 64), None, pids))
            if label == "exported" and "hop_breakdown_p50_ms" not in result:
                sink.spans.clear()
                _time_mesh(address, n, None)
                time.sleep(6)  # the batch span processor exports every 5 s
                result["hop_breakdown_p50_ms"] = hop_breakdown(sink.spans)
    finally:
        sink.stop()
    for label in ("exported", "not_exported"):
        runs = [r for r in result["runs"] if r["label"] == label]
        result[label] = {
            "per_s": [r["per_s"] for r in runs],
            "cpu_ms_per_diagnosis": round(
                statistics.fmean(sum(r.get("cpu_ms_per_diagnosis", {}).values()) for r in runs), 2
            ),
        }
    exported, not_exported = result["exported"], result["not_exported"]
    result["throughput_ratio"] = round(sum(exported["per_s"]) / sum(not_exported["per_s"]), 3)
    if not_exported["cpu_ms_per_diagnosis"]:
        result["cpu_ratio"] = round(exported["cpu_ms_per_diagnosis"] / not_exported["cpu_ms_per_diagnosis"], 3)
    return result


def _round_trip_floor(mesh: Mesh, names: Sequence[str], calls: int = 300) -> dict[str, float]:
    """p50 ms of a gRPC health Check to each service from one asyncio client, sequentially: the cost of a round
    trip through grpc's Python asyncio stacks on both sides with no work, no tracing and the shared interceptors'
    cheapest path. A text Diagnose makes three such hops one after another (client -> orchestrator -> knowledge,
    then -> report), so three of these bound from below what the mesh can add over the same cores in-process."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def one(address: str) -> float:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub: Any = health_pb2_grpc.HealthStub(channel)  # its methods are set in __init__ (untyped)
            for _ in range(30):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                times.append((time.perf_counter() - started) * 1000)
            return round(statistics.median(times), 3)

    return {name: asyncio.run(one(mesh.address(name))) for name in names}


def _cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, all its threads (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _throughput(
    address: str, clients: int, total: int, image: bytes | None = None, processes: dict[str, int] | None = None
) -> dict:
    """`total` text diagnoses spread over `clients` concurrent callers on one asyncio channel: diagnoses/s,
    latency percentiles and every non-OK status (there should be none); with `processes` (name -> pid), the CPU
    each spent per diagnosis (ms), which is what bounds throughput once the cores are busy."""
    before = {name: _cpu_seconds(pid) for name, pid in (processes or {}).items()}
    result = _throughput_run(address, clients, total, image)
    cpu = {}
    for name, pid in (processes or {}).items():
        start, end = before[name], _cpu_seconds(pid)
        if start is not None and end is not None and result["n"]:
            cpu[name] = round((end - start) * 1000 / result["n"], 2)
    if cpu:
        result["cpu_ms_per_diagnosis"] = cpu
    return result


def _throughput_run(address: str, clients: int, total: int, image: bytes | None) -> dict:
    from collections import Counter

    async def go() -> dict:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            stub = copilot_pb2_grpc.CopilotServiceStub(channel)
            metadata = auth_metadata("technician-bench")
            for i in range(3):
                await stub.Diagnose(
                    diagnose_request("PUNE-IN", "CNC-A-102", PROBLEMS[i], image), metadata=metadata, timeout=60
                )
            times: list[float] = []
            errors: Counter = Counter()
            remaining = [total]

            async def caller(k: int) -> None:
                while remaining[0] > 0:
                    remaining[0] -= 1
                    request = diagnose_request(
                        "PUNE-IN", f"CNC-A-{k:03d}", PROBLEMS[remaining[0] % len(PROBLEMS)], image
                    )
                    started = time.perf_counter()
                    try:
                        await stub.Diagnose(request, metadata=metadata, timeout=60)
                        times.append((time.perf_counter() - started) * 1000)
                    except grpc.aio.AioRpcError as exc:
                        errors[exc.code().name] += 1

            began = time.perf_counter()
            await asyncio.gather(*(caller(k) for k in range(clients)))
            elapsed = time.perf_counter() - began
            return {
                "clients": clients,
                "diagnoses": total,
                "per_s": round(len(times) / elapsed, 1),
                "errors": dict(errors),
                **percentiles(times),
            }

    return asyncio.run(go())


def restart_with(mesh: Mesh, name: str, **env: str) -> None:
    """Restart one service of the mesh with `env` added to its environment; back once it serves."""
    mesh.services[name].env.update(env)
    mesh.restart(name)
    mesh.wait_ready(names=[name])


def run(n: int, output: Path, console: Console) -> dict:
    photo = SAMPLE.read_bytes()
    results: dict = {
        "when": datetime.now(UTC).isoformat(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "n": n,
    }
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        # one principal sends every call: lift the per-principal rate limit (default 600/minute) for the run
        mesh = Mesh.on_free_ports(data_dir=data / "mesh", extra_env={"ORCHESTRATOR_RATE_LIMIT": "1000000/minute"})
        started = time.monotonic()
        mesh.start()
        try:
            with console.status("cold start (empty store)…"):
                per_service = mesh.wait_ready()
            results["cold_start_s"] = round(time.monotonic() - started, 2)
            results["cold_start_per_service_s"] = {k: round(v, 2) for k, v in per_service.items()}
            with console.status("gRPC round trips with no work (health checks)…"):
                results["round_trip_floor_p50_ms"] = _round_trip_floor(mesh, ["orchestrator", "knowledge", "report"])
            with console.status(f"{n} text-only diagnoses through the mesh…"):
                results["mesh_text"] = percentiles(_time_mesh(mesh.address("orchestrator"), n, None))
            with console.status(f"{max(10, n // 5)} photo diagnoses through the mesh…"):
                results["mesh_photo"] = percentiles(_time_mesh(mesh.address("orchestrator"), max(10, n // 5), photo))
            results["throughput_text"] = []
            pids = {name: proc.handle.pid for name, proc in mesh.services.items() if name != "vision"}
            for clients in (1, 8, 32):
                with console.status(f"throughput: {clients} concurrent clients…"):
                    results["throughput_text"].append(
                        _throughput(mesh.address("orchestrator"), clients, max(4 * n, 8 * clients), None, pids)
                    )
            with console.status("photo diagnoses with vision and knowledge in parallel…"):
                restart_with(mesh, "orchestrator", ORCHESTRATOR_PARALLEL_STAGES="true")
                results["mesh_photo_parallel"] = percentiles(
                    _time_mesh(mesh.address("orchestrator"), max(10, n // 5), photo)
                )
                results["throughput_photo_parallel"] = _throughput(
                    mesh.address("orchestrator"), 4, max(20, n // 2), photo
                )
                restart_with(mesh, "orchestrator", ORCHESTRATOR_PARALLEL_STAGES="false")
                results["throughput_photo_sequential"] = _throughput(
                    mesh.address("orchestrator"), 4, max(20, n // 2), photo
                )
            results["tracing"] = _tracing_cost(mesh, n, console)
        finally:
            mesh.stop()
        restarted = time.monotonic()
        mesh.start()
        try:
            mesh.wait_ready()
            results["warm_start_s"] = round(time.monotonic() - restarted, 2)
        finally:
            mesh.stop()
        with console.status("same cores in-process…"):
            agents = InProcessAgents(data / "inproc")
            results["inproc_text"] = percentiles(_time_in_process(agents, data / "inproc", n, None))
            results["inproc_photo"] = percentiles(_time_in_process(agents, data / "inproc", max(10, n // 5), photo))
    for kind in ("text", "photo"):
        mesh_p, local_p = results[f"mesh_{kind}"], results[f"inproc_{kind}"]
        results[f"{kind}_overhead"] = {
            "p50_added_ms": round(mesh_p["p50_ms"] - local_p["p50_ms"], 2),
            "p50_ratio": round(mesh_p["p50_ms"] / local_p["p50_ms"], 2),
            "p99_ratio": round(mesh_p["p99_ms"] / local_p["p99_ms"], 2),
        }

    table = Table(title="Diagnose latency: mesh (4 processes, gRPC) vs same cores in-process")
    for column in ("workload", "path", "n", "p50 ms", "p90 ms", "p99 ms", "mean ms"):
        table.add_column(column)
    for kind in ("text", "photo"):
        for path in ("mesh", "inproc"):
            r = results[f"{path}_{kind}"]
            table.add_row(
                kind,
                path,
                str(r["n"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p90_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['mean_ms']:.1f}",
            )
    console.print(table)
    for kind in ("text", "photo"):
        o = results[f"{kind}_overhead"]
        console.print(
            f"{kind}: mesh adds {o['p50_added_ms']:.1f} ms at p50 (p50 ratio {o['p50_ratio']:.2f}×, "
            f"p99 ratio {o['p99_ratio']:.2f}×)"
        )
    floor = results["round_trip_floor_p50_ms"]
    results["text_overhead"]["floor_three_hops_ms"] = round(sum(floor.values()), 2)
    console.print(
        f"gRPC round trip with no work (health Check, p50 ms): {floor}; a text Diagnose's three hops in a row: "
        f"{results['text_overhead']['floor_three_hops_ms']:.1f} ms of the "
        f"{results['text_overhead']['p50_added_ms']:.1f} ms the mesh adds"
    )
    throughput = Table(title="text-only Diagnose throughput through the mesh (one asyncio channel)")
    for column in ("clients", "diagnoses", "per s", "p50 ms", "p99 ms", "errors", "CPU ms per diagnosis"):
        throughput.add_column(column)
    for r in results["throughput_text"]:
        throughput.add_row(
            str(r["clients"]),
            str(r["diagnoses"]),
            f"{r['per_s']:.1f}",
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            str(sum(r["errors"].values())),
            ", ".join(f"{k} {v:.1f}" for k, v in r.get("cpu_ms_per_diagnosis", {}).items()),
        )
    console.print(throughput)
    sequential, parallel = results["throughput_photo_sequential"], results["throughput_photo_parallel"]
    results["parallel_stages"] = {
        "photo_p50_sequential_ms": results["mesh_photo"]["p50_ms"],
        "photo_p50_parallel_ms": results["mesh_photo_parallel"]["p50_ms"],
        "photo_per_s_4_clients_sequential": sequential["per_s"],
        "photo_per_s_4_clients_parallel": parallel["per_s"],
    }
    console.print(
        f"photo diagnoses, vision and knowledge sequential vs parallel: p50 "
        f"{results['mesh_photo']['p50_ms']:.0f} vs {results['mesh_photo_parallel']['p50_ms']:.0f} ms (1 client); "
        f"{sequential['per_s']:.1f} vs {parallel['per_s']:.1f} diagnoses/s (4 clients)"
    )
    tracing = results["tracing"]
    console.print(
        f"tracing ({' '.join('A' if x == 'exported' else 'B' for x in tracing['order'])}; A: every span exported over "
        f"OTLP, B: not exported): {tracing['exported']['per_s']} vs {tracing['not_exported']['per_s']} diagnoses/s "
        f"at 8 clients ({tracing['throughput_ratio']:.3f}×), services' CPU per diagnosis "
        f"{tracing['exported']['cpu_ms_per_diagnosis']} vs {tracing['not_exported']['cpu_ms_per_diagnosis']} ms "
        f"({tracing.get('cpu_ratio', float('nan')):.3f}×)"
    )
    console.print(f"where a text Diagnose's time goes (p50 ms, from its trace): {tracing['hop_breakdown_p50_ms']}")
    console.print(
        f"cold start of the mesh (empty store): {results['cold_start_s']:.1f}s "
        f"{results['cold_start_per_service_s']}; restart with the store in place: {results['warm_start_s']:.1f}s"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {output}")
    return results


def _vision_load(address: str, image: bytes, concurrency: int, total: int) -> tuple[list[float], float]:
    from copilot.agents.v1 import vision_pb2, vision_pb2_grpc
    from copilot.v1 import common_pb2

    async def go() -> tuple[list[float], float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = vision_pb2_grpc.VisionServiceStub(channel)
            request = vision_pb2.AnalyzeImageRequest(image=common_pb2.Image(data=image), equipment_type="brushed-steel")
            # as the orchestrator calls it: its service token, naming the user each call is for (one per client)
            service = auth_metadata(mint_token("bench", Role.SERVICE, secret=BENCH_SECRET))
            for _ in range(3):
                await stub.AnalyzeImage(request, timeout=60, metadata=service)
            times: list[float] = []
            remaining = [total]

            async def worker(client: int) -> None:
                metadata = (*service, (END_USER_HEADER, f"technician-{client}"))
                while remaining[0] > 0:
                    remaining[0] -= 1
                    started = time.perf_counter()
                    await stub.AnalyzeImage(request, timeout=120, metadata=metadata)
                    times.append((time.perf_counter() - started) * 1000)

            began = time.perf_counter()
            await asyncio.gather(*(worker(client) for client in range(concurrency)))
            return times, time.perf_counter() - began

    return asyncio.run(go())


def run_vision(total: int, output: Path, console: Console) -> dict:
    """Images/s and latency of AnalyzeImage at 1, 4 and 16 concurrent clients, dynamic batching off and on,
    against a real vision process each time."""
    from grpc_health.v1 import health_pb2

    from copilot_cli.launcher import ServiceProcess, free_port, health_status

    photo = SAMPLE.read_bytes()
    results: dict = {"when": datetime.now(UTC).isoformat(), "images_per_run": total, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for batching in (False, True):
            port = free_port()
            env = {
                **__import__("os").environ,
                "VISION_PORT": str(port),
                "VISION_METRICS_PORT": "0",
                "AUTH_MODE": "dev",
                "AUTH_JWT_SECRET": BENCH_SECRET,
                "VISION_BATCHING": str(batching).lower(),
                "VISION_REFERENCE_DIR": f"{tmp}/refs-{batching}",
            }
            proc = ServiceProcess("vision", port, env, Path(tmp) / f"vision-{batching}.log")
            proc.spawn()
            try:
                with console.status(f"vision (batching {'on' if batching else 'off'}) warming up…"):
                    while health_status(f"127.0.0.1:{port}") != health_pb2.HealthCheckResponse.SERVING:
                        if not proc.alive:
                            raise RuntimeError((Path(tmp) / f"vision-{batching}.log").read_text()[-2000:])
                        time.sleep(0.2)
                for concurrency in (1, 4, 16):
                    with console.status(f"batching {'on' if batching else 'off'}, {concurrency} clients…"):
                        times, elapsed = _vision_load(f"127.0.0.1:{port}", photo, concurrency, total)
                    row = {
                        "batching": batching,
                        "clients": concurrency,
                        "images_per_s": round(total / elapsed, 2),
                        **percentiles(times),
                    }
                    results["runs"].append(row)
            finally:
                proc.handle.terminate()
                proc.handle.wait(timeout=30)
    table = Table(title="Vision AnalyzeImage: dynamic batching off vs on (one process, 2 CPU cores)")
    for column in ("batching", "clients", "images/s", "p50 ms", "p99 ms"):
        table.add_column(column)
    for row in results["runs"]:
        table.add_row(
            "on" if row["batching"] else "off",
            str(row["clients"]),
            f"{row['images_per_s']:.1f}",
            f"{row['p50_ms']:.1f}",
            f"{row['p99_ms']:.1f}",
        )
    console.print(table)
    by = {(r["batching"], r["clients"]): r for r in results["runs"]}
    for clients in (1, 4, 16):
        on, off = by[(True, clients)], by[(False, clients)]
        ratio = {
            "throughput_ratio": round(on["images_per_s"] / off["images_per_s"], 2),
            "p99_ratio": round(on["p99_ms"] / off["p99_ms"], 2),
        }
        results[f"clients_{clients}"] = ratio
        console.print(
            f"{clients} clients: batching gives {ratio['throughput_ratio']:.2f}× throughput, "
            f"p99 {ratio['p99_ratio']:.2f}×"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {output}")
    return results
