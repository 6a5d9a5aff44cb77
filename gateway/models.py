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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.storage import sha256_file

__all__ = ["ModelError", "ModelManifest", "ModelRegistry", "TimedSession", "choose_providers", "default_models_dir"]

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


class TimedSession:
    """An InferenceSession proxy that adds up the time spent in ``run``."""

    def __init__(self, session: Any) -> None:
        self._session = session
        self.seconds = 0.0
        self._lock = threading.Lock()

    def run(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self._session.run(*args, **kwargs)
        finally:
            with self._lock:
                self.seconds += time.perf_counter() - t0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


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
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3  # keep provider fallback chatter out of service logs
        sess = ort.InferenceSession(str(self.path(name)), sess_options=opts, providers=self.providers)
        log.info("model %s %s loaded on %s", name, self.get(name).version, sess.get_providers()[0])
        with self._lock:
            return self._sessions.setdefault(name, sess)
