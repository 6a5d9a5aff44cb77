"""GPU execution features, checked on the CPU: IO binding, warm-up, batch sizes, device slots, provider display.

No GPU is needed: ONNX Runtime's CPU provider supports IO binding, so the
bound path is compared with the plain one on the real exported models, and a
fake session that says it runs on CUDA checks where outputs would be bound.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway import cli
from gateway.config import Config, ConfigError, DeviceClass, load_config
from gateway.contract import Identity, Instance, ModelSpec, RunContext, Selection, Series, SeriesInfo, WarmUpCapable
from gateway.jobs import DeviceSlots, JobRunner, job_device
from gateway.metrics import Metrics
from gateway.models import ModelRegistry, TimedSession, default_models_dir, provider_label, warmup_inputs
from gateway.storage import DataDir

MODELS = default_models_dir()
EXPORTED = sorted(p.stem for p in MODELS.glob("*.json"))

WAIT = 10.0  # seconds; only reached when a test is about to fail


@pytest.fixture(scope="module")
def registry() -> ModelRegistry:
    return ModelRegistry(MODELS, providers=["CPUExecutionProvider"])


def random_feeds(reg: ModelRegistry, name: str, batch: int = 3, size: int = 16) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = warmup_inputs(reg.get(name), batch=batch, size=size)
    return {k: rng.random(v.shape).astype(v.dtype) for k, v in feeds.items()}


# ------------------------------------------------------------------ IO binding
@pytest.mark.parametrize("name", EXPORTED)
def test_io_binding_gives_the_outputs_of_plain_run(registry: ModelRegistry, name: str) -> None:
    session = registry.session(name)
    bound = TimedSession(session, force_io_binding=True)
    plain = TimedSession(session)
    assert bound.io_binding and not plain.io_binding
    feeds = random_feeds(registry, name)
    got, want = bound.run(None, feeds), plain.run(None, feeds)
    assert len(got) == len(want) == len(session.get_outputs())
    for g, w in zip(got, want, strict=True):
        assert isinstance(g, np.ndarray) and g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)
    assert bound.seconds > 0 and plain.seconds > 0


def test_io_binding_keeps_the_order_of_output_names(registry: ModelRegistry) -> None:
    session = registry.session("wsi-mil-head")
    feeds = random_feeds(registry, "wsi-mil-head", batch=5)
    names = ["tile_probability", "slide_probability"]  # not the model's order, and a subset
    got = TimedSession(session, force_io_binding=True).run(names, feeds)
    want = session.run(names, feeds)
    assert [g.shape for g in got] == [(5,), (1,)]
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_cpu_sessions_keep_plain_run_when_io_binding_is_configured(registry: ModelRegistry) -> None:
    s = TimedSession(registry.session("wsi-mil-head"), io_binding=True)
    assert (s.provider, s.device, s.io_binding) == ("CPUExecutionProvider", "cpu", False)


class _FakeBinding:
    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log

    def bind_cpu_input(self, name: str, value: np.ndarray) -> None:
        self.log.append(("input", name, value.flags.c_contiguous))

    def bind_output(self, name: str, device: str, device_id: int) -> None:
        self.log.append(("output", name, device, device_id))

    def copy_outputs_to_cpu(self) -> list[np.ndarray]:
        return [np.full(1, i, np.float32) for i, e in enumerate(e for e in self.log if e[0] == "output")]


class _FakeCudaSession:
    """Says it runs on CUDA device 1, records what TimedSession binds."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []

    def get_providers(self) -> list[str]:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return {"CUDAExecutionProvider": {"device_id": "1"}, "CPUExecutionProvider": {}}

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="a", type="tensor(float)"), SimpleNamespace(name="b", type="tensor(float)")]

    def io_binding(self) -> _FakeBinding:
        return _FakeBinding(self.log)

    def run_with_iobinding(self, binding: _FakeBinding, run_options: Any = None) -> None:
        self.log.append(("run_with_iobinding",))

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> list[np.ndarray]:
        self.log.append(("run",))
        return []


def test_io_binding_on_a_cuda_session_binds_outputs_on_its_device() -> None:
    fake = _FakeCudaSession()
    s = TimedSession(fake, io_binding=True)
    assert (s.device, s.io_binding) == ("gpu", True)
    x = np.ones((4, 3), np.float32)[:, :2]  # not contiguous: must be made so before binding
    out = s.run(None, {"x": x})
    assert [o.tolist() for o in out] == [[0.0], [1.0]]
    assert fake.log == [
        ("input", "x", True),
        ("output", "a", "cuda", 1),
        ("output", "b", "cuda", 1),
        ("run_with_iobinding",),
    ]
    assert not TimedSession(fake, io_binding=False).io_binding  # [models] io_binding = false


def test_feeds_that_cannot_be_bound_take_the_plain_path() -> None:
    fake = _FakeCudaSession()
    TimedSession(fake, io_binding=True).run(["a"], {"x": np.array(["text"], dtype=object)})
    assert fake.log == [("run",)]


# ------------------------------------------------------------------ warm-up
def test_warmup_inputs_follow_the_manifest(registry: ModelRegistry) -> None:
    feeds = warmup_inputs(registry.get("lf2hf-net"))
    assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
        "image": ((1, 1, 32, 32), np.dtype(np.float32)),
        "cond": ((1, 8), np.dtype(np.float32)),
    }
    assert warmup_inputs(registry.get("wsi-mil-encoder"))["tiles"].shape == (1, 3, 32, 32)


def test_warm_up_runs_every_exported_model(caplog: pytest.LogCaptureFixture) -> None:
    reg = ModelRegistry(MODELS, providers=["CPUExecutionProvider"])
    with caplog.at_level(logging.INFO, logger="gateway.models"):
        results = reg.warm_up(EXPORTED + EXPORTED[:1])  # a duplicate runs once
    assert results == {name: None for name in EXPORTED}
    assert reg.loaded() == {n: (reg.get(n).version, "CPUExecutionProvider") for n in EXPORTED}
    assert sum("warmed up on CPU" in r.getMessage() for r in caplog.records) == len(EXPORTED)


def _copy_model(tmp_path: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    folder = tmp_path / "models"
    folder.mkdir(exist_ok=True)
    manifest = json.loads((MODELS / f"{name}.json").read_text())
    shutil.copy(MODELS / manifest["file"], folder / manifest["file"])
    edit(manifest)
    (folder / f"{name}.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["inputs"][0].update(dtype="float99"),  # numpy does not know it
        lambda m: m["inputs"][0].update(name="not_an_input"),  # the session rejects the feed
        lambda m: m["inputs"][0].update(shape=["N", 7]),  # wrong width
    ],
    ids=["dtype", "name", "shape"],
)
def test_broken_input_spec_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, edit: Callable[[dict[str, Any]], None]
) -> None:
    reg = ModelRegistry(_copy_model(tmp_path, "wsi-mil-head", edit), providers=["CPUExecutionProvider"])
    with caplog.at_level(logging.WARNING, logger="gateway.models"):
        results = reg.warm_up(["wsi-mil-head", "no-such-model"])
    assert results["wsi-mil-head"] and results["no-such-model"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("model wsi-mil-head: warm-up failed" in w for w in warnings)
    assert any("model no-such-model: warm-up failed" in w for w in warnings)


# ------------------------------------------------------------------ job runner
class _Recorder:
    """A pipeline that records its RunContext and, when told to, blocks until released."""

    name = "rec"

    def __init__(self, specs: Sequence[ModelSpec] = (), block: bool = False) -> None:
        self.specs = list(specs)
        self.block = block
        self.contexts: list[RunContext] = []
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.entered = threading.Semaphore(0)

    def selects(self, series: SeriesInfo) -> Selection:
        return Selection(True, "always")

    def models(self) -> Sequence[ModelSpec]:
        return self.specs

    def run(self, series: Series, ctx: RunContext) -> list[Any]:
        with self.lock:
            self.contexts.append(ctx)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.release()
        try:
            if self.block:
                assert self.release.wait(WAIT), "test never released the pipeline"
        finally:
            with self.lock:
                self.active -= 1
        return []


class _FakeIndex:
    def __init__(self) -> None:
        self.succeeded: list[int] = []
        self.failed: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def assemble(self, series_uid: str) -> Series:
        inst = Instance("1.2.3.4", "1.2.840.10008.5.1.4.1.1.4", Path("/nonexistent.dcm"), {})
        return Series(series_uid, "1.2.3", "MR", "TEST", [inst])

    def renew_lease(self, job_id: int, owner: str, until: float) -> bool:
        return True  # every job here stays its runner's

    def job_succeeded(self, job_id: int, *args: Any, **kwargs: Any) -> bool:
        with self.lock:
            self.succeeded.append(job_id)
        return True

    def job_failed(self, job_id: int, owner: str, error: str, **kwargs: Any) -> None:
        with self.lock:
            self.failed.append((job_id, error))

    def earlier_results(self, series_uid: str, pipeline: str, version: int) -> list[Any]:
        return []  # every series here is on its first version: nothing to supersede


def _runner(tmp_path: Path, pipeline: Any, config: Config, registry: ModelRegistry) -> tuple[JobRunner, _FakeIndex]:
    index = _FakeIndex()
    runner = JobRunner(
        config,
        index,  # type: ignore[arg-type]
        DataDir(tmp_path / "data"),
        registry,
        {pipeline.name: pipeline},
        Metrics(CollectorRegistry()),
        "test",
    )
    return runner, index


def _job(job_id: int) -> SimpleNamespace:
    return SimpleNamespace(id=job_id, pipeline="rec", series_uid="1.2.3.4.5", series_version=1, attempts=1)


def test_batch_sizes_override_reaches_run_context(tmp_path: Path, registry: ModelRegistry) -> None:
    pipeline = _Recorder([ModelSpec("wsi-mil-head", batch_size=3), ModelSpec("wsi-mil-encoder", batch_size=5)])
    config = Config.model_validate({"models": {"batch_sizes": {"wsi-mil-head": 7}}})
    runner, index = _runner(tmp_path, pipeline, config, registry)
    runner.run(_job(1), "me")
    assert index.succeeded == [1], index.failed
    ctx = pipeline.contexts[0]
    assert dict(ctx.batch_sizes) == {"wsi-mil-head": 7, "wsi-mil-encoder": 5}
    assert ctx.batch_size("wsi-mil-head", 1) == 7
    assert ctx.batch_size("not-declared", 11) == 11
    assert all(isinstance(s, TimedSession) for s in ctx.sessions.values())
    assert job_device(ctx.sessions.values()) is DeviceClass.CPU  # type: ignore[arg-type]


def test_run_context_without_batch_sizes_uses_the_default() -> None:
    ctx = RunContext(sessions={}, uid=str, identity=Identity("m", "n", "1", "s"), workdir=Path("."))
    assert ctx.batch_size("anything", 42) == 42


def test_ivim_net_estimator_takes_the_batch_size(registry: ModelRegistry) -> None:
    from pipelines.ivim.infer import select_method

    estimator = select_method("net", registry.session("ivim-net"), batch=1000)
    assert estimator.batch == 1000  # type: ignore[attr-defined]


def _wait(predicate: Callable[[], bool], what: str) -> None:
    done = threading.Event()
    for _ in range(int(WAIT / 0.01)):
        if predicate():
            return
        done.wait(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_device_slots_limit_concurrency() -> None:
    slots = DeviceSlots({DeviceClass.GPU: 1})
    assert slots.limit(DeviceClass.GPU) == 1 and slots.limit(DeviceClass.CPU) is None
    inside: list[str] = []
    release = {n: threading.Event() for n in ("a", "b")}
    waited: list[str] = []

    def job(name: str) -> None:
        with slots.hold(DeviceClass.GPU, on_wait=lambda: waited.append(name)):
            inside.append(name)
            assert release[name].wait(WAIT)

    a = threading.Thread(target=job, args=("a",))
    a.start()
    _wait(lambda: inside == ["a"], "job a to hold the GPU slot")
    b = threading.Thread(target=job, args=("b",))
    b.start()
    _wait(lambda: slots.waiting(DeviceClass.GPU) == 1, "job b to wait for the GPU slot")
    assert inside == ["a"] and waited == ["b"]
    release["a"].set()
    a.join(WAIT)
    _wait(lambda: inside == ["a", "b"], "job b to take the slot")
    release["b"].set()
    b.join(WAIT)
    assert slots.waiting(DeviceClass.GPU) == 0


def test_device_without_limit_is_not_held_back() -> None:
    slots = DeviceSlots({DeviceClass.GPU: 1})
    barrier = threading.Barrier(3, timeout=WAIT)  # breaks unless all three are inside at once

    def job() -> None:
        with slots.hold(DeviceClass.CPU):
            barrier.wait()

    threads = [threading.Thread(target=job) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert not barrier.broken


def test_runner_runs_one_gpu_job_at_a_time(
    tmp_path: Path, registry: ModelRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.jobs

    pipeline = _Recorder(block=True)
    runner, index = _runner(tmp_path, pipeline, Config(), registry)  # default: max_concurrent_per_device gpu = 1
    monkeypatch.setattr(gateway.jobs, "job_device", lambda sessions: DeviceClass.GPU)
    threads = [threading.Thread(target=runner.run, args=(_job(i), "me")) for i in (1, 2)]
    for t in threads:
        t.start()
    assert pipeline.entered.acquire(timeout=WAIT)
    _wait(lambda: runner.device_slots.waiting(DeviceClass.GPU) == 1, "the second job to wait for the GPU")
    assert pipeline.active == 1
    pipeline.release.set()
    for t in threads:
        t.join(WAIT)
    assert sorted(index.succeeded) == [1, 2] and pipeline.max_active == 1


def test_runner_warm_up_follows_configuration(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    reg = ModelRegistry(MODELS, providers=["CPUExecutionProvider"])
    pipeline = _Recorder([ModelSpec("wsi-mil-head"), ModelSpec("missing-model")])
    off = Config.model_validate({"models": {"warmup": False}})
    assert _runner(tmp_path, pipeline, off, reg)[0].warm_up() == {}
    assert reg.loaded() == {}
    with caplog.at_level(logging.WARNING):
        results = _runner(tmp_path, pipeline, Config(), reg)[0].warm_up()
    assert results["wsi-mil-head"] is None and results["missing-model"]
    assert "wsi-mil-head" in reg.loaded()


def test_runner_warms_models_at_their_job_batch_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.models

    reg = ModelRegistry(MODELS, providers=["CPUExecutionProvider"])
    fed: dict[str, int] = {}
    real = gateway.models.warmup_inputs

    def recording(manifest: Any, batch: int = 1, size: int = 32) -> dict[str, np.ndarray]:
        feeds = real(manifest, batch=batch, size=size)
        fed[manifest.name] = max(fed.get(manifest.name, 0), batch)
        return feeds

    monkeypatch.setattr(gateway.models, "warmup_inputs", recording)
    pipeline = _Recorder([ModelSpec("wsi-mil-head", batch_size=48), ModelSpec("wsi-mil-encoder", batch_size=256)])
    config = Config.model_validate({"models": {"batch_sizes": {"wsi-mil-head": 96}}})
    assert _runner(tmp_path, pipeline, config, reg)[0].warm_up() == {"wsi-mil-head": None, "wsi-mil-encoder": None}
    assert fed == {"wsi-mil-head": 96, "wsi-mil-encoder": 256}  # the node's override, else the pipeline's size
    # A large declared batch is warmed at a batch whose input stays within the cap.
    monkeypatch.setattr(gateway.models, "WARMUP_INPUT_BYTES", 100 * 3 * 32 * 32 * 4)
    fed.clear()
    assert reg.warm_up({"wsi-mil-encoder": 256}) == {"wsi-mil-encoder": None}
    assert fed == {"wsi-mil-encoder": 100}


class _WarmingRecorder(_Recorder):
    def __init__(self, fail: bool) -> None:
        super().__init__()
        self.fail = fail
        self.warmed = 0

    def warm_up(self) -> None:
        self.warmed += 1
        if self.fail:
            raise OSError("table file missing")


@pytest.mark.parametrize("fail", [False, True])
def test_runner_calls_the_pipelines_own_warm_up_hook(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, fail: bool
) -> None:
    pipeline = _WarmingRecorder(fail)
    assert isinstance(pipeline, WarmUpCapable)
    reg = ModelRegistry(MODELS, providers=["CPUExecutionProvider"])
    off = Config.model_validate({"models": {"warmup": False}})
    _runner(tmp_path, pipeline, off, reg)[0].warm_up()
    assert pipeline.warmed == 0  # [models] warmup = false: nothing at start
    with caplog.at_level(logging.WARNING, logger="gateway.jobs"):
        _runner(tmp_path, pipeline, Config(), reg)[0].warm_up()  # never raises
    assert pipeline.warmed == 1
    warned = [r.getMessage() for r in caplog.records if "warm_up() raised" in r.getMessage()]
    expected = "pipeline rec: warm_up() raised OSError: table file missing; its first job loads it"
    assert warned == ([expected] if fail else [])


# ------------------------------------------------------------------ configuration
def test_configuration_defaults_and_validation(tmp_path: Path) -> None:
    cfg = Config()
    assert (cfg.models.warmup, cfg.models.io_binding, cfg.models.batch_sizes) == (True, True, {})
    assert cfg.jobs.max_concurrent_per_device == {DeviceClass.GPU: 1}
    good = tmp_path / "good.toml"
    good.write_text(
        '[models]\nwarmup = false\nio_binding = false\nbatch_sizes = { "wsi-mil-encoder" = 512 }\n'
        "[jobs]\nmax_concurrent_per_device = { gpu = 2, cpu = 4 }\n"
    )
    cfg = load_config(good, environ={})
    assert cfg.models.batch_sizes == {"wsi-mil-encoder": 512}
    assert cfg.jobs.max_concurrent_per_device == {DeviceClass.GPU: 2, DeviceClass.CPU: 4}
    for text, where in [
        ('[models]\nbatch_sizes = { "wsi-mil-encoder" = 0 }\n', "models.batch_sizes"),
        ("[jobs]\nmax_concurrent_per_device = { tpu = 1 }\n", "jobs.max_concurrent_per_device"),
        ("[jobs]\nmax_concurrent_per_device = { gpu = 0 }\n", "jobs.max_concurrent_per_device"),
        ('[models]\nwarmup = "sometimes"\n', "models.warmup"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=rf"bad\.toml: {where}"):
            load_config(bad, environ={})


# ------------------------------------------------------------------ provider shown
def test_models_list_shows_the_provider_column(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("MODEL"))
    assert header.split() == ["MODEL", "VERSION", "FILE", "SHA256", "PROVIDER", "BATCH"]
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in EXPORTED]
    assert rows and all(r[4] in ("CPU", "CUDA", "TensorRT") for r in rows)


def test_models_list_survives_odd_providers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["WeirdExecutionProvider", 42])
    assert cli.main(["models", "list"]) == 0
    assert "PROVIDER" in capsys.readouterr().out

    def broken() -> list[str]:
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(onnxruntime, "get_available_providers", broken)
    assert cli.main(["models", "list"]) == 0
    assert "unknown (RuntimeError: driver exploded)" in capsys.readouterr().out


def test_provider_labels() -> None:
    assert [provider_label(p) for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider")] == ["TensorRT", "CUDA"]
    assert provider_label("CPUExecutionProvider") == "CPU"
    assert provider_label("WeirdExecutionProvider") == "Weird" and provider_label(42) == "42"


def test_model_info_is_exported(registry: ModelRegistry) -> None:
    metrics = Metrics(CollectorRegistry())
    assert "aigw_model_info" in generate_latest(metrics.registry).decode()  # the family exists before any model
    metrics.watch_models(registry)
    registry.session("wsi-mil-head")
    labels = {"model": "wsi-mil-head", "version": registry.get("wsi-mil-head").version}
    value = metrics.registry.get_sample_value("aigw_model_info", {**labels, "provider": "CPUExecutionProvider"})
    assert value == 1
