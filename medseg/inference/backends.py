"""Inference backends: an exported network (ONNX, TorchScript) behind the same call as the eager one.

Each backend is an ``nn.Module`` whose ``forward`` takes a float32 patch batch (B, C, *roi) and returns
the logits (B, K, *roi) as a torch tensor, so :class:`~medseg.inference.predictor.Predictor` keeps doing
preprocessing, sliding window, mirroring and inversion unchanged. An exported file is used only with its
sidecar (``FILE.json``, written by ``medseg export``): the file's own SHA-256 must match the sidecar (a
tampered file is refused before it is parsed) and the sidecar's ``weights_sha256`` must be the bundle's.

ONNX Runtime and OpenVINO are optional (the ``export`` extra); asking for them without the package is a
:class:`~medseg.errors.CheckpointError` naming the extra.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from medseg.errors import CheckpointError
from medseg.models.bundle import ModelBundle, weights_sha256

Backend = Literal["torch", "torchscript", "onnxruntime", "openvino"]
BACKENDS: tuple[str, ...] = ("torch", "torchscript", "onnxruntime", "openvino")
#: Formats each backend runs; OpenVINO reads ONNX files itself (no separate IR to keep in sync).
BACKEND_FORMATS: dict[str, tuple[str, ...]] = {"torchscript": ("torchscript",), "onnxruntime": ("onnx",),
                                               "openvino": ("onnx",)}
EXPORT_DIR = "exports"
#: Default file names in ``RUN/exports/``, by (format, precision).
EXPORT_NAMES: dict[tuple[str, str], str] = {("onnx", "float32"): "model.onnx", ("onnx", "int8"): "model.int8.onnx",
                                            ("torchscript", "float32"): "model.torchscript.pt"}
SIDECAR_FORMAT = "medseg-export-1"
#: Runtime precisions of a backend: float32 everywhere; bfloat16 where the CPU has it (torch autocast,
#: OpenVINO's inference-precision hint). An int8 model is a file of its own (``medseg export --int8``).
RuntimePrecision = Literal["float32", "bfloat16"]


def sidecar_path(model_file: Path) -> Path:
    """``model.onnx`` -> ``model.onnx.json``: the export's description, parity figures and provenance."""
    return model_file.with_name(model_file.name + ".json")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ExportInfo:
    """What a sidecar says about an exported file (the parts inference relies on)."""

    path: Path
    format: str
    precision: str
    file_sha256: str
    weights_sha256: str
    roi_size: list[int]
    raw: dict[str, Any]


def read_export_info(model_file: Path) -> ExportInfo:
    """Read and check an export's sidecar; refuses a file whose bytes differ from what was exported."""
    model_file = Path(model_file)
    side = sidecar_path(model_file)
    if not model_file.is_file():
        raise CheckpointError(f"{model_file}: no such exported model (run `medseg export` first)")
    try:
        raw = json.loads(side.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{model_file}: its sidecar {side.name} is missing; only files written by "
                              "`medseg export` (which checks parity) are used") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{side}: unreadable export sidecar ({exc})") from None
    if not isinstance(raw, dict) or raw.get("sidecar_format") != SIDECAR_FORMAT:
        raise CheckpointError(f"{side}: not a medseg export sidecar (expected sidecar_format {SIDECAR_FORMAT})")
    try:
        info = ExportInfo(model_file, str(raw["format"]), str(raw["precision"]), str(raw["file_sha256"]),
                          str(raw["weights_sha256"]), [int(v) for v in raw["roi_size"]], raw)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{side}: export sidecar lacks or garbles {exc}") from None
    actual = file_sha256(model_file)
    if actual != info.file_sha256:
        raise CheckpointError(f"{model_file}: its SHA-256 differs from the one recorded at export in {side.name} "
                              "(file edited or corrupted); export it again")
    return info


def find_export(bundle: ModelBundle, backend: str, model_file: Path | None = None) -> ExportInfo:
    """The export ``backend`` runs for ``bundle``: ``model_file``, else the run folder's ``exports/`` default.

    Refuses an export made from other weights than the bundle's, of a format the backend cannot run,
    or for another patch size.
    """
    formats = BACKEND_FORMATS[backend]
    if model_file is None:
        if bundle.path is None:
            raise CheckpointError(f"backend {backend} needs an exported model: pass --model-file")
        folder = bundle.path.parent / EXPORT_DIR
        candidates = [folder / EXPORT_NAMES[(fmt, "float32")] for fmt in formats]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise CheckpointError(f"{folder}: no {' or '.join(c.name for c in candidates)} for backend {backend}; "
                                  f"run `medseg export {bundle.path.parent} --format {formats[0]}` or pass --model-file")
        model_file = found[0]
    info = read_export_info(model_file)
    if info.format not in formats:
        raise CheckpointError(f"{model_file}: a {info.format} export; backend {backend} runs {' or '.join(formats)}")
    expected = weights_sha256(bundle.weights)
    if info.weights_sha256 != expected:
        raise CheckpointError(f"{model_file}: exported from other weights (sha256 {info.weights_sha256[:12]}...) "
                              f"than the model {bundle.path} ({expected[:12]}...); export this model again")
    if info.roi_size != list(bundle.inference.roi_size):
        raise CheckpointError(f"{model_file}: exported for patch {info.roi_size}, the model uses {bundle.inference.roi_size}")
    return info


def _require(module: str, backend: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise CheckpointError(f"backend {backend} needs the {module} package: pip install 'medseg[export]'") from None


class MainOutput(nn.Module):
    """The network's main output only: deep-supervision heads (a list or tuple while training) are dropped."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.network(x)
        return out[0] if isinstance(out, list | tuple) else out


class AutocastNetwork(nn.Module):
    """An eager network run under CPU/CUDA autocast in ``dtype`` (bfloat16 on CPUs that have it)."""

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.network = network
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.network(x).float()


class TorchScriptNetwork(nn.Module):
    """A TorchScript export (``torch.jit``), run on the CPU."""

    def __init__(self, path: Path):
        super().__init__()
        self.module = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float().cpu()).to(x.device)


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX file run by ONNX Runtime's CPU provider (all graph optimisations on)."""

    def __init__(self, path: Path, threads: int | None = None):
        super().__init__()
        ort = _require("onnxruntime", "onnxruntime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feed = {self.input_name: x.detach().float().cpu().contiguous().numpy()}
        return torch.from_numpy(self.session.run([self.output_name], feed)[0]).to(x.device)


class OpenVinoNetwork(nn.Module):
    """An ONNX file compiled by OpenVINO for the CPU, in float32 unless ``precision`` says bfloat16.

    OpenVINO picks bf16 by itself on CPUs with bf16 instructions; the hint is always set, so what runs is
    what was asked (and what was parity-checked).
    """

    def __init__(self, path: Path, precision: RuntimePrecision = "float32", threads: int | None = None):
        super().__init__()
        ov = _require("openvino", "openvino")
        core = ov.Core()
        config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": {"float32": "f32", "bfloat16": "bf16"}[precision],
                                  "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
        self.output = self.compiled.outputs[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.compiled(x.detach().float().cpu().contiguous().numpy())[self.output]
        return torch.from_numpy(result.copy()).to(x.device)


def bf16_supported() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX); elsewhere bf16 is emulated, slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def build_backend(bundle: ModelBundle, backend: str = "torch", model_file: Path | None = None,
                  precision: RuntimePrecision = "float32") -> nn.Module:
    """The network of ``bundle`` as ``backend`` runs it (eager weights for ``torch``, else its checked export)."""
    if backend not in BACKENDS:
        raise CheckpointError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if precision not in ("float32", "bfloat16"):
        raise CheckpointError(f"unknown precision {precision!r}: float32 or bfloat16")
    if backend == "torch":
        if model_file is not None:
            raise CheckpointError("--model-file is an exported model; backend torch runs the bundle's own weights")
        net = MainOutput(bundle.build_network())
        return AutocastNetwork(net, torch.bfloat16).eval() if precision == "bfloat16" else net.eval()
    if precision == "bfloat16" and backend != "openvino":
        raise CheckpointError(f"bfloat16 runs with backend torch or openvino, not {backend}")
    info = find_export(bundle, backend, model_file)
    if backend == "torchscript":
        return TorchScriptNetwork(info.path).eval()
    if backend == "onnxruntime":
        return OnnxRuntimeNetwork(info.path).eval()
    return OpenVinoNetwork(info.path, precision).eval()
