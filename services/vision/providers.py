"""Vision providers behind one interface, chosen by `VISION_PROVIDER`:

* `patchcore` (default, offline): the reference-based engine in this package, with dynamic batching.
* `hf-endpoint`: BLIP-2 (`Salesforce/blip2-opt-2.7b`) through a Hugging Face inference
  endpoint (its image-to-text API: POST the image bytes, read `generated_text`). Plain httpx, because
  huggingface_hub refuses every request while HF_HUB_OFFLINE=1, which the images set for the local models.
* `blip2-local`: BLIP-2 through local transformers, from `VISION_MODEL_PATH` (no hub access).
* `openai-compatible`: a vision chat model behind an OpenAI-compatible `/chat/completions` (vLLM, TGI,
  Ollama ...), asked for JSON defects.

Caption models give a sentence, not scores: defects are read from it by keyword and get a fixed, modest
confidence, and no box. Every provider's output is validated before it leaves the service.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from typing import Protocol

import numpy as np
from PIL import Image

from copilot.domain import BoundingBox, Defect, DefectType, VisionFindings
from copilot.runtime.batching import DynamicBatcher
from copilot.runtime.hosted import AsyncHostedModelClient, HostedModel, join
from copilot.runtime.metrics import copilot_metrics
from services.vision.core import ImageLimits, VisionEngine, decode_image, source_size

CAPTION_PROMPT = (
    "Question: Describe any visible defects, damage or quality issues on this manufacturing equipment surface. Answer:"
)
#: the types a hosted model may name (DefectType, less the PatchCore-only "anomaly")
PROMPT_TYPES = "|".join(t.value for t in DefectType if t is not DefectType.ANOMALY)
JSON_PROMPT = (
    "You inspect photos of manufacturing equipment. List the visible defects as JSON: "
    '{"defects": [{"type": "' + PROMPT_TYPES + '", '
    '"confidence": 0.0-1.0, "box": [x_min, y_min, x_max, y_max] (0-1, optional), "description": "..."}], '
    '"description": "one sentence"}. Answer with JSON only. An empty list means no defect.'
)
KEYWORDS = {
    DefectType.CRACK: ("crack", "fracture", "fissure"),
    DefectType.CORROSION: ("rust", "corrosion", "corroded", "oxidation", "oxidised", "oxidized"),
    DefectType.SCRATCH: ("scratch", "scrape", "gouge", "abrasion"),
    DefectType.DENT: ("dent", "deformation", "deformed", "bent"),
    DefectType.CONTAMINATION: ("dirt", "stain", "oil", "spatter", "contamination", "debris"),
    DefectType.COATING_DEFECT: ("peel", "blister", "flaking", "chipped paint", "coating"),
    DefectType.WELD_POROSITY: ("porosity", "pores", "pinhole"),
}
CAPTION_CONFIDENCE = 0.6
_KNOWN = {t.value for t in DefectType if t is not DefectType.ANOMALY}


class VisionProvider(Protocol):
    name: str

    async def analyze(self, data: bytes, equipment_type: str, include_heatmap: bool) -> VisionFindings: ...

    async def close(self) -> None: ...


class PatchCoreProvider:
    """Decode and score run in the default thread pool (in parallel); the model path (backbone forward and the
    memory banks' nearest-neighbour search, `VisionEngine.measure`) runs per request in that pool too on a CPU,
    on one dedicated model thread on a GPU (CUDA keeps per-thread handles: many threads cost seconds of set-up
    and queue behind each other), or batched through the DynamicBatcher."""

    name = "patchcore"

    def __init__(self, engine: VisionEngine, batcher: DynamicBatcher | None, decode_slots: int = 4) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.engine = engine
        self.batcher = batcher
        # Decoding is where a photo costs memory (up to ~125 MB for the largest WebP allowed, see ImageLimits): at
        # most this many at once, whatever the thread pool's size (it follows the host's cores, not the pod's).
        self._decode_slots = asyncio.Semaphore(decode_slots)
        on_gpu = getattr(getattr(engine.extractor, "device", None), "type", "cpu") != "cpu"
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="vision-model") if on_gpu else None

    def warm_up(self, sample, max_batch: int = 1) -> None:
        """Run the model path once per batch size it will see (a GPU picks kernels per input shape), on the
        thread(s) that will run it. Blocking: call it from warm-up, not from the event loop."""
        sizes = range(1, (max_batch if self.batcher is not None else 1) + 1)
        for size in sizes:
            items = [(sample, "")] * size
            if self.batcher is not None:
                self.batcher.call_in_worker(self.engine.measure, items)
            elif self._model_thread is not None:
                self._model_thread.submit(self.engine.measure, items).result()
            else:
                self.engine.measure(items)

    async def analyze(self, data, equipment_type, include_heatmap):
        if self.batcher is None:
            image, pixels = await self._prepare(data, include_heatmap)
            copilot_metrics().batch_size.record(1)  # without batching every forward pass is one image
            items = [(pixels, equipment_type)]
            if self._model_thread is not None:
                loop = asyncio.get_running_loop()
                measured = (await loop.run_in_executor(self._model_thread, self.engine.measure, items))[0]
            else:
                measured = (await asyncio.to_thread(self.engine.measure, items))[0]
        else:
            # announced before decoding: a batch forming meanwhile waits for this image; a lone one goes at once
            with self.batcher.coming() as arrival:
                image, pixels = await self._prepare(data, include_heatmap)
                measured = await arrival.submit((pixels, equipment_type))  # the batcher records each pass's size
        return await asyncio.to_thread(self.engine.score, image, measured, equipment_type, include_heatmap)

    async def _prepare(self, data: bytes, display: bool) -> tuple[Image.Image, np.ndarray]:
        async with self._decode_slots:
            return await asyncio.to_thread(self.engine.prepare, data, display)

    async def close(self):
        if self.batcher is not None:
            await self.batcher.close()
        if self._model_thread is not None:
            self._model_thread.shutdown(wait=False, cancel_futures=True)


def defects_from_caption(caption: str) -> tuple[Defect, ...]:
    text = caption.lower()
    found = []
    for kind, words in KEYWORDS.items():
        if any(re.search(rf"\b{re.escape(w)}", text) for w in words):
            found.append(Defect(kind, CAPTION_CONFIDENCE, f"From the caption: {caption.strip()}"))
    return tuple(found)


def caption_findings(caption: str, model: str, size: tuple[int, int]) -> VisionFindings:
    defects = defects_from_caption(caption)
    return VisionFindings(
        defects=defects,
        confidence=CAPTION_CONFIDENCE if defects else 0.5,
        anomaly_score=CAPTION_CONFIDENCE if defects else 0.0,
        description=caption.strip() or "The model gave no caption.",
        model=model,
        width=size[0],
        height=size[1],
        reference_set="",
    )


class HfEndpointProvider:
    """BLIP-2 captioning through a Hugging Face inference endpoint (or any server speaking its API)."""

    name = "hf-endpoint"

    def __init__(self, model: HostedModel, limits: ImageLimits) -> None:
        if not model.endpoint:
            raise ValueError("VISION_MODEL_ENDPOINT (the URL of the BLIP-2 inference endpoint) is required")
        self.client = AsyncHostedModelClient(model)
        self.endpoint = model.endpoint
        self.model_id = model.name or "Salesforce/blip2-opt-2.7b"
        self.limits = limits

    async def analyze(self, data, equipment_type, include_heatmap):
        image = await asyncio.to_thread(decode_image, data, self.limits)
        mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        reply = await self.client.post(self.endpoint, content=data, headers={"content-type": mime})
        output = reply.json()
        first = output[0] if isinstance(output, list) and output else output
        caption = first.get("generated_text", "") if isinstance(first, dict) else ""
        return caption_findings(caption, f"hf-endpoint/{self.model_id}", source_size(image))

    async def close(self):
        await self.client.close()


class Blip2LocalProvider:
    """BLIP-2 through local transformers from a model folder (weights are never downloaded)."""

    name = "blip2-local"

    def __init__(self, model_path: str, limits: ImageLimits, max_new_tokens: int = 40) -> None:
        from pathlib import Path

        from transformers import Blip2ForConditionalGeneration, Blip2Processor

        if not model_path or not Path(model_path).is_dir():
            raise FileNotFoundError(f"VISION_MODEL_PATH must name a local BLIP-2 folder (got {model_path!r})")
        self.processor = Blip2Processor.from_pretrained(model_path, local_files_only=True)
        self.model = Blip2ForConditionalGeneration.from_pretrained(model_path, local_files_only=True).eval()
        self.model_path = model_path
        self.limits = limits
        self.max_new_tokens = max_new_tokens

    def _caption(self, data: bytes) -> tuple[str, tuple[int, int]]:
        import torch

        image = decode_image(data, self.limits)
        inputs = self.processor(images=image, text=CAPTION_PROMPT, return_tensors="pt")
        with torch.inference_mode():
            ids = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(ids, skip_special_tokens=True)[0], source_size(image)

    async def analyze(self, data, equipment_type, include_heatmap):
        caption, size = await asyncio.to_thread(self._caption, data)
        return caption_findings(caption, f"blip2-local/{self.model_path}", size)

    async def close(self):
        return None


class OpenAICompatibleProvider:
    """A vision chat model behind an OpenAI-compatible API, asked for JSON defects."""

    name = "openai-compatible"

    def __init__(self, model: HostedModel, limits: ImageLimits) -> None:
        if not model.endpoint or not model.name:
            raise ValueError("VISION_MODEL_ENDPOINT and VISION_MODEL_NAME are required for openai-compatible")
        self.client = AsyncHostedModelClient(model)
        self.url = join(model.endpoint, "/chat/completions")
        self.model = model.name
        self.limits = limits

    async def analyze(self, data, equipment_type, include_heatmap):
        image = await asyncio.to_thread(decode_image, data, self.limits)
        mime = "image/png" if data.startswith(b"\x89PNG") else "image/jpeg"
        payload = {
            "model": self.model,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "text",
                            "text": JSON_PROMPT + (f" Equipment type: {equipment_type}." if equipment_type else ""),
                        },
                        {
                            "type": "image_url",
                            "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"},
                        },
                    ],
                }
            ],
        }
        reply = await self.client.post(self.url, json=payload)
        content = reply.json()["choices"][0]["message"]["content"]
        return parse_json_findings(content, f"openai-compatible/{self.model}", source_size(image))

    async def close(self):
        await self.client.close()


def parse_json_findings(content: str, model: str, size: tuple[int, int]) -> VisionFindings:
    """Validate a model's JSON answer: unknown types become 'other', numbers are clamped, bad boxes dropped.
    An answer that is not JSON raises ValueError (the stage then degrades)."""
    match = re.search(r"\{.*\}", content, re.S)
    if match is None:
        raise ValueError("the vision model did not answer with JSON")
    answer = json.loads(match.group(0))
    defects = []
    for item in answer.get("defects", [])[:10]:
        kind = str(item.get("type", "other")).strip().lower().replace(" ", "-")
        kind = kind if kind in _KNOWN else DefectType.OTHER.value
        confidence = min(1.0, max(0.0, float(item.get("confidence", 0.5))))
        box = None
        raw = item.get("box")
        if isinstance(raw, list) and len(raw) == 4:
            x0, y0, x1, y1 = (min(1.0, max(0.0, float(v))) for v in raw)
            if x1 > x0 and y1 > y0:
                box = BoundingBox(x0, y0, x1, y1)
        defects.append(Defect(kind, round(confidence, 4), str(item.get("description", ""))[:300], box))
    confidence = sum(d.confidence for d in defects) / len(defects) if defects else 0.5
    return VisionFindings(
        defects=tuple(defects),
        confidence=round(confidence, 4),
        anomaly_score=max((d.confidence for d in defects), default=0.0),
        description=str(answer.get("description", ""))[:500],
        model=model,
        width=size[0],
        height=size[1],
        reference_set="",
    )
