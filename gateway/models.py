"""Exported models: manifests, integrity checks and ONNX Runtime sessions.

Each model in the models directory is a pair: ``<name>.onnx`` (or the file the
manifest names) and ``<name>.json``, its manifest (name, version, sha256,
inputs and outputs, preprocessing constants, training provenance, held-out
metrics). A model whose file does not hash to the manifest's sha256 is
refused: the pipeline that needs it is listed as unavailable.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.storage import sha256_file

__all__ = [
    "GPU_PROVIDERS",
    "ModelError",
    "ModelManifest",
    "ModelRegistry",
    "TimedSession",
    "choose_providers",
    "default_models_dir",
    "open_session",
    "provider_label",
    "warmup_inputs",
]

log = logging.getLogger(__name__)


class ModelError(RuntimeError):
    """A model is missing, its manifest is invalid or its hash does not match."""


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    shape: list[int | str | None]
    dtype: str


class ModelManifest(BaseModel):
    """The machine-readable model card."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")
    version: str
    file: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    thresholds: dict[str, Any] = Field(default_factory=dict)


def default_models_dir() -> Path:
    """``AIGW_MODELS_DIR``, else ``exported_models/`` next to the source tree or in the prefix."""
    env = os.environ.get("AIGW_MODELS_DIR")
    if env:
        return Path(env)
    for cand in (
        Path(__file__).resolve().parent.parent / "exported_models",
        Path(sys.prefix) / "share" / "aigw" / "exported_models",
    ):
        if cand.is_dir():
            return cand
    return Path("exported_models")


def _cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without driver or GPU)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    try:
        if lib.cuInit(0) != 0:
            return 0
        n = ctypes.c_int(0)
        if lib.cuDeviceGetCount(ctypes.byref(n)) != 0:
            return 0
        return int(n.value)
    except Exception:
        return 0


def choose_providers(requested: Sequence[str] | str = "auto") -> list[str]:
    """Execution providers in preference order (TensorRT, CUDA, CPU when 'auto').

    onnxruntime-gpu lists the CUDA provider even on machines with no GPU, so
    'auto' also asks the driver whether a device exists.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested != "auto":
        chosen = [p for p in requested if p in available]
        missing = [p for p in requested if p not in available]
        if missing:
            log.warning("execution providers not available here: %s", ", ".join(missing))
        return chosen or ["CPUExecutionProvider"]
    chosen = []
    if _cuda_device_count() > 0:
        chosen += [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
        if "TensorrtExecutionProvider" in chosen:
            try:
                ctypes.CDLL("libnvinfer.so.10")
            except OSError:
                chosen.remove("TensorrtExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


#: ONNX Runtime execution providers that run on a CUDA device.
GPU_PROVIDERS = frozenset({"TensorrtExecutionProvider", "CUDAExecutionProvider"})
#: Largest input (bytes, all inputs together) one warm-up run is given: a large
#: declared batch of large items is warmed at a smaller batch rather than
#: allocating gigabytes at start.
WARMUP_INPUT_BYTES: int = 64 * 2**20

_PROVIDER_LABELS = {
    "TensorrtExecutionProvider": "TensorRT",
    "CUDAExecutionProvider": "CUDA",
    "CPUExecutionProvider": "CPU",
}

#: ONNX type names a manifest may use instead of numpy's (``float`` is float32 in ONNX, float64 in numpy).
_ONNX_DTYPES = {"float": "float32", "double": "float64", "float16": "float16", "int64": "int64", "int32": "int32"}


def provider_label(provider: object) -> str:
    """Short name of an execution provider for people: TensorRT, CUDA, CPU, or the name without its suffix."""
    name = str(provider)
    return _PROVIDER_LABELS.get(name) or name.removesuffix("ExecutionProvider") or name


def _first_provider(session: Any) -> str:
    """The provider a session prefers; sessions that cannot say (test doubles) count as CPU."""
    try:
        return str(session.get_providers()[0])
    except Exception:
        return "CPUExecutionProvider"


def _bind_target(session: Any, provider: str) -> tuple[str, int]:
    """Where IO binding puts outputs: ``("cuda", device_id)`` for the GPU providers, else the host."""
    if provider not in GPU_PROVIDERS:
        return "cpu", 0
    try:
        options = session.get_provider_options().get(provider, {})
        return "cuda", int(options.get("device_id", 0))
    except Exception:
        return "cuda", 0


class TimedSession:
    """An InferenceSession proxy that adds up the time spent in ``run`` and binds buffers on a GPU.

    ``run(output_names, input_feed, run_options=None)`` behaves as
    ``InferenceSession.run``: outputs are numpy arrays, in the order of
    ``output_names`` (all outputs in model order when None or empty). With IO
    binding the inputs are bound from host memory, the outputs are allocated
    by ONNX Runtime on the session's device and copied back once, which spares
    the per-call output staging on CUDA and TensorRT. Feeds that are not plain
    numeric numpy arrays (OrtValues, strings) take the ordinary path.

    Parameters
    ----------
    session : onnxruntime.InferenceSession
        The shared session (``run`` is thread-safe in ONNX Runtime).
    io_binding : bool
        Use IO binding when the session's first provider is CUDA or TensorRT
        (``[models] io_binding``); sessions on the CPU keep the plain ``run``.
    force_io_binding : bool
        Use IO binding whatever the provider. The CPU provider supports it as
        well, which lets tests compare both paths on machines without a GPU.
    """

    def __init__(self, session: Any, io_binding: bool = False, force_io_binding: bool = False) -> None:
        self._session = session
        self.seconds = 0.0
        self._lock = threading.Lock()
        #: The execution provider the session prefers (ONNX Runtime's name).
        self.provider = _first_provider(session)
        #: ``"gpu"`` when that provider runs on a CUDA device, else ``"cpu"``.
        self.device = "gpu" if self.provider in GPU_PROVIDERS else "cpu"
        self.io_binding = force_io_binding or (io_binding and self.device == "gpu")
        self._target = _bind_target(session, self.provider) if self.io_binding else ("cpu", 0)
        if self.io_binding:
            try:
                # Sequence and map outputs cannot be bound to a device buffer.
                tensors_only = all(str(o.type).startswith("tensor(") for o in session.get_outputs())
            except Exception:
                tensors_only = False
            self.io_binding = tensors_only

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any = None) -> Any:
        """Run the model as ``InferenceSession.run`` does, timing the call."""
        t0 = time.perf_counter()
        try:
            if self.io_binding and all(_bindable(v) for v in input_feed.values()):
                return self._run_bound(output_names, input_feed, run_options)
            return self._session.run(output_names, input_feed, run_options)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - t0

    def _run_bound(
        self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any], run_options: Any
    ) -> list[np.ndarray]:
        # A binding per call: the session is shared by concurrent jobs, a binding is not thread-safe.
        binding = self._session.io_binding()
        for name, value in input_feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        names = list(output_names) if output_names else [o.name for o in self._session.get_outputs()]
        device, device_id = self._target
        for name in names:
            binding.bind_output(name, device, device_id)
        self._session.run_with_iobinding(binding, run_options)
        return list(binding.copy_outputs_to_cpu())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


def _bindable(value: Any) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind in "biuf"


def _numpy_dtype(name: str) -> np.dtype[Any]:
    """A manifest dtype (numpy's ``float32`` or ONNX's ``tensor(float)``) as a numpy dtype."""
    bare = name.strip().removeprefix("tensor(").removesuffix(")")
    return np.dtype(_ONNX_DTYPES.get(bare, bare))


def warmup_inputs(manifest: ModelManifest, batch: int = 1, size: int = 32) -> dict[str, np.ndarray]:
    """Small inputs for one run of a model, built from its manifest's input shapes and dtypes.

    Parameters
    ----------
    manifest : ModelManifest
        The model card; its ``inputs`` give names, shapes and dtypes.
    batch : int
        Size of a symbolic first (batch) dimension.
    size : int
        Size of every other symbolic dimension (image height, tokens...).

    Raises
    ------
    TypeError
        For a dtype numpy does not know.
    """
    feeds = {}
    for spec in manifest.inputs:
        dims = [
            d if isinstance(d, int) and d > 0 else (batch if i == 0 else size) for i, d in enumerate(spec.shape)
        ]
        # Ones, not zeros: a masked or normalised input of zeros divides by zero in some graphs.
        feeds[spec.name] = np.ones(dims, dtype=_numpy_dtype(spec.dtype))
    return feeds


def open_session(
    path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = None
) -> Any:
    """An ONNX Runtime session: the one place sessions are made, for the service and the lab alike.

    Parameters
    ----------
    path : str or pathlib.Path
        The ``.onnx`` file.
    providers : sequence of str
        Execution providers in order of preference (the registry passes
        :func:`choose_providers`' choice; benchmarks and training use the CPU).
    threads : int, optional
        Intra- and inter-op threads; None leaves ONNX Runtime's default (one
        per core). Benchmarks fix it so figures are comparable between machines.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # keep provider fallback chatter out of service logs
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))


class ModelRegistry:
    """The models directory: manifests, verification and shared sessions."""

    def __init__(self, root: Path | None = None, providers: Sequence[str] | str = "auto") -> None:
        self.root = Path(root) if root else default_models_dir()
        self.requested_providers = providers
        self._manifests: dict[str, ModelManifest] = {}
        self._errors: dict[str, str] = {}
        self._verified: dict[str, str | None] = {}
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._providers: list[str] | None = None
        self.reload()

    def reload(self) -> None:
        self._manifests.clear()
        self._errors.clear()
        self._verified.clear()
        if not self.root.is_dir():
            return
        for path in sorted(self.root.glob("*.json")):
            try:
                m = ModelManifest.model_validate(json.loads(path.read_text()))
            except (ValidationError, json.JSONDecodeError, OSError) as exc:
                self._errors[path.stem] = f"{path.name}: invalid manifest: {str(exc).splitlines()[0]}"
                continue
            if m.name in self._manifests:
                self._errors[m.name] = f"{path.name}: duplicate model name {m.name!r}"
                continue
            self._manifests[m.name] = m

    @property
    def providers(self) -> list[str]:
        if self._providers is None:
            self._providers = choose_providers(self.requested_providers)
        return self._providers

    def manifests(self) -> dict[str, ModelManifest]:
        return dict(self._manifests)

    def errors(self) -> dict[str, str]:
        return dict(self._errors)

    def get(self, name: str) -> ModelManifest:
        if name in self._manifests:
            return self._manifests[name]
        if name in self._errors:
            raise ModelError(self._errors[name])
        raise ModelError(f"model {name!r} has no manifest in {self.root}")

    def path(self, name: str) -> Path:
        return self.root / self.get(name).file

    def verify(self, name: str) -> str | None:
        """None if the model file exists and matches its sha256, else the reason."""
        with self._lock:
            if name in self._verified:
                return self._verified[name]
        try:
            m = self.get(name)
            path = self.root / m.file
            if not path.is_file():
                reason: str | None = f"model file {m.file} is missing"
            else:
                digest = sha256_file(path)
                reason = (
                    None
                    if digest == m.sha256
                    else f"model file {m.file} sha256 {digest[:12]}... does not match manifest "
                    f"{m.sha256[:12]}...: refused"
                )
        except ModelError as exc:
            reason = str(exc)
        with self._lock:
            self._verified[name] = reason
        return reason

    def session(self, name: str) -> Any:
        """A shared InferenceSession for the model (thread-safe ``run``), created once."""
        with self._lock:
            if name in self._sessions:
                return self._sessions[name]
        reason = self.verify(name)
        if reason is not None:
            raise ModelError(reason)
        sess = open_session(self.path(name), self.providers)
        log.info("model %s %s loaded on %s", name, self.get(name).version, sess.get_providers()[0])
        with self._lock:
            return self._sessions.setdefault(name, sess)

    def loaded(self) -> dict[str, tuple[str, str]]:
        """Models whose session exists: name -> (version, execution provider the session prefers)."""
        with self._lock:
            sessions = dict(self._sessions)
        out = {}
        for name, sess in sessions.items():
            m = self._manifests.get(name)
            out[name] = (m.version if m is not None else "unknown", _first_provider(sess))
        return out

    def warm_up(self, names: Iterable[str] | Mapping[str, int], io_binding: bool = True) -> dict[str, str | None]:
        """Create each model's session and run it once, so that the first job does not pay for it.

        The first run on CUDA or TensorRT also selects kernels (and builds
        TensorRT engines), which can take far longer than the inference. The
        inputs come from the manifest (:func:`warmup_inputs`). A model that
        fails is logged as a warning with its name and left to the first job,
        which will fail or succeed on its own; warm-up never raises.

        Parameters
        ----------
        names : iterable of str, or mapping of str to int
            Models to warm up (duplicates are run once), or model -> the batch
            size its jobs use: the warm-up batch is that size, so that the
            first job does not grow ONNX Runtime's buffers either, but never
            more than :data:`WARMUP_INPUT_BYTES` of input (a plain iterable:
            batch 1).
        io_binding : bool
            Run through IO binding where jobs will (``[models] io_binding``).

        Returns
        -------
        dict
            Model name -> None when warmed up, else the reason it failed.
        """
        batches = dict(names) if isinstance(names, Mapping) else dict.fromkeys(names, 1)
        results: dict[str, str | None] = {}
        for name, batch in batches.items():
            t0 = time.perf_counter()
            try:
                session = TimedSession(self.session(name), io_binding=io_binding)
                manifest = self.get(name)
                item_bytes = sum(a.nbytes for a in warmup_inputs(manifest).values())
                batch = max(1, min(int(batch), WARMUP_INPUT_BYTES // max(item_bytes, 1)))
                session.run(None, warmup_inputs(manifest, batch=batch))
            except Exception as exc:
                lines = str(exc).strip().splitlines()
                results[name] = f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"
                log.warning("model %s: warm-up failed (the first job will load it): %s", name, results[name])
                continue
            results[name] = None
            log.info(
                "model %s warmed up on %s in %.2f s%s",
                name,
                provider_label(session.provider),
                time.perf_counter() - t0,
                " (IO binding)" if session.io_binding else "",
            )
        return results
