"""Hosted vision providers against a local HTTP server started by the test (no network)."""

from __future__ import annotations

import asyncio
import json

import pytest

from copilot.runtime.hosted import HostedModel
from services.vision import samples
from services.vision.core import ImageLimits
from services.vision.providers import (
    Blip2LocalProvider,
    HfEndpointProvider,
    OpenAICompatibleProvider,
    defects_from_caption,
    parse_json_findings,
)
from tests.model_server import FakeModelServer

PHOTO = samples.to_bytes(samples.make_defect("brushed-steel", "corrosion", 5), "PNG")


@pytest.fixture
def model_server(request):
    param = getattr(request, "param", '{"defects": [], "description": "clean"}')
    options = param if isinstance(param, dict) else {"chat_content": param}
    server = FakeModelServer(
        **{
            "chat_content": '{"defects": [], "description": "clean"}',
            "generated_text": "a rusty steel plate with a long crack across it",
            **options,
        }
    )
    yield server
    server.close()


@pytest.mark.parametrize("model_server", [{"fail_first": 1}], indirect=True)
async def test_hf_endpoint_sends_the_image_retries_a_busy_server_and_reads_defects_from_the_caption(model_server):
    model = HostedModel(endpoint=f"{model_server.url}/models/blip2", api_key="hf_secret", timeout_s=10)
    provider = HfEndpointProvider(model, ImageLimits())
    findings = await provider.analyze(PHOTO, "brushed-steel", False)
    await provider.close()
    assert len(model_server.requests) == 2  # the 503 ("model is loading") was retried
    path, headers, body = model_server.requests[1]
    assert path == "/models/blip2" and body == PHOTO
    assert headers.get("authorization") == "Bearer hf_secret"
    assert {d.type for d in findings.defects} == {"corrosion", "crack"}
    assert all(d.box is None and d.confidence == 0.6 for d in findings.defects)
    assert findings.model.startswith("hf-endpoint/") and findings.width == 256


CHAT = json.dumps(
    {
        "defects": [
            {"type": "Corrosion", "confidence": 0.91, "box": [0.3, 0.3, 0.5, 0.6], "description": "rust patch"},
            {"type": "alien-goo", "confidence": 7, "box": [0.9, 0.9, 0.1, 0.1]},
        ],
        "description": "rust on a steel plate",
    }
)


@pytest.mark.parametrize("model_server", [f"Here you go:\n```json\n{CHAT}\n```"], indirect=True)
async def test_openai_compatible_asks_for_json_and_validates_the_answer(model_server):
    model = HostedModel(endpoint=model_server.url + "/v1", name="llava", api_key="sk-test", timeout_s=10)
    provider = OpenAICompatibleProvider(model, ImageLimits())
    findings = await provider.analyze(PHOTO, "brushed-steel", False)
    await provider.close()
    path, headers, body = model_server.requests[0]
    sent = json.loads(body)
    assert path == "/v1/chat/completions" and headers.get("authorization") == "Bearer sk-test"
    assert sent["model"] == "llava"
    assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    first, second = findings.defects
    assert (first.type, first.confidence, first.box.x_min) == ("corrosion", 0.91, 0.3)
    assert (second.type, second.confidence, second.box) == ("other", 1.0, None)  # clamped, bad box dropped


def test_non_json_answers_are_refused():
    with pytest.raises(ValueError, match="JSON"):
        parse_json_findings("I think it is fine.", "m", (1, 1))


def test_caption_keywords():
    assert {d.type for d in defects_from_caption("Paint is peeling and there are pinholes")} == {
        "coating-defect",
        "weld-porosity",
    }
    assert defects_from_caption("a clean polished surface") == ()


def test_local_blip2_needs_a_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="VISION_MODEL_PATH"):
        Blip2LocalProvider(str(tmp_path / "missing"), ImageLimits())


class _Device:
    def __init__(self, kind):
        self.type = kind


class _RecordingEngine:
    """Stands in for VisionEngine around the provider: records the batch sizes and threads of each model path."""

    def __init__(self, device):
        import threading

        self.extractor = type("Extractor", (), {"device": _Device(device)})()
        self.forwards: list[tuple[int, str]] = []
        self._threading = threading

    def prepare(self, data, display=False):
        return data, data

    def measure(self, items):
        self.forwards.append((len(items), self._threading.current_thread().name))
        return [f"measured-{i}" for i in range(len(items))]

    def score(self, image, measured, equipment_type, include_heatmap):
        return measured


async def test_on_a_gpu_every_forward_runs_on_one_model_thread_and_warm_up_covers_batch_shapes():
    from copilot.runtime.batching import DynamicBatcher
    from services.vision.providers import PatchCoreProvider

    engine = _RecordingEngine("cuda")
    provider = PatchCoreProvider(engine, None)
    provider.warm_up("img")
    await asyncio.gather(*(provider.analyze(b"x", "", False) for _ in range(6)))
    assert {thread for _, thread in engine.forwards} == {next(iter(engine.forwards))[1]}
    assert engine.forwards[0][1].startswith("vision-model")
    await provider.close()

    batched = _RecordingEngine("cuda")
    provider = PatchCoreProvider(batched, DynamicBatcher(batched.measure, max_batch=4, max_wait_s=0))
    provider.warm_up("img", max_batch=4)
    assert [size for size, _ in batched.forwards] == [1, 2, 3, 4]
    await provider.close()

    cpu = _RecordingEngine("cpu")
    provider = PatchCoreProvider(cpu, None)
    await asyncio.gather(*(provider.analyze(b"x", "", False) for _ in range(6)))
    assert not any(thread.startswith("vision-model") for _, thread in cpu.forwards)  # the shared pool on a CPU
    await provider.close()


async def test_with_batching_a_lone_image_goes_at_once_and_concurrent_images_share_a_pass():
    from copilot.runtime.batching import DynamicBatcher
    from services.vision.providers import PatchCoreProvider

    engine = _RecordingEngine("cpu")
    # an hour of max_wait: a lone image held for it would time the test out
    provider = PatchCoreProvider(engine, DynamicBatcher(engine.measure, max_batch=8, max_wait_s=3600))
    assert await asyncio.wait_for(provider.analyze(b"x", "", False), 60) == "measured-0"
    # eight at once: each is announced before its decode, so the first pass waits for the rest
    await asyncio.wait_for(asyncio.gather(*(provider.analyze(b"x", "", False) for _ in range(8))), 60)
    assert [size for size, _ in engine.forwards] == [1, 8]
    await provider.close()


@pytest.mark.parametrize(
    ("env", "device", "on"),
    [
        ({}, "cpu", False),  # a CPU: measured slower with batching
        ({}, "cuda", True),  # a GPU: measured faster from 4 clients up
        ({"VISION_BATCHING": "false"}, "cuda", False),
        ({"VISION_BATCHING": "true"}, "cpu", True),
        ({"VISION_BATCHING": "auto"}, "cuda:1", True),
    ],
)
def test_batching_is_on_by_default_only_on_a_gpu(monkeypatch, env, device, on):
    from services.vision.server import VisionSettings

    for name, value in {"VISION_DEVICE": device, **env}.items():
        monkeypatch.setenv(name, value)
    assert VisionSettings().batching_on() is on


def test_a_batching_setting_that_is_not_a_choice_is_refused(monkeypatch):
    from pydantic import ValidationError

    from services.vision.server import VisionSettings

    monkeypatch.setenv("VISION_BATCHING", "sometimes")
    with pytest.raises(ValidationError, match="batching"):
        VisionSettings()
