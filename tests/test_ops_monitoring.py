"""Monitoring files under ops/ and the metrics they rely on.

promtool (from the Debian package ``prometheus``) checks the Prometheus
configuration and alert rules and runs the rules' unit tests. The Grafana
dashboard and the alert rules may only name metrics that the gateway's
registry exports, so neither can drift from the code. The GPU collector is
tested without a GPU, through a fake NVML module with pynvml's API.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from gateway._gpu import MAX_GPUS, GpuCollector
from gateway.config import load_config
from gateway.metrics import Metrics
from tests.conftest import REPO, need

PROM = REPO / "ops" / "prometheus"
ALERTS = PROM / "alerts.yml"
ALERT_TESTS = PROM / "tests" / "alerts_test.yml"
DASHBOARD = REPO / "ops" / "grafana" / "aigw-dashboard.json"
PROVISIONING = REPO / "ops" / "grafana" / "provisioning"

_AIGW_NAME = re.compile(r"\baigw_[a-z0-9_]+")
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run promtool; fails the test (rather than skipping it) when promtool is not installed."""
    return subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def exported_names() -> set[str]:
    """Every sample name a gateway process can export (histograms as _bucket/_sum/_count)."""
    names = set()
    for family in Metrics(CollectorRegistry()).registry.collect():
        names.add(family.name)
        names.update(family.name + s for s in _SUFFIXES.get(family.type, ()))
    return names


def alert_blocks() -> dict[str, str]:
    """Alert name -> the text of its rule in alerts.yml."""
    parts = re.split(r"^\s+- alert: (\w+)\n", ALERTS.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard: panel targets and template variable queries."""

    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition") and isinstance(value, str):
                    yield value
                else:
                    yield from walk(value)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return list(walk(json.loads(DASHBOARD.read_text())))


# ----------------------------------------------------------------- promtool
def test_promtool_check_rules() -> None:
    r = promtool("check", "rules", ALERTS.name, cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_blocks())} rules found" in r.stdout + r.stderr


def test_promtool_check_config() -> None:
    # rule_files in prometheus.yml is relative to the file, so this also loads alerts.yml.
    r = promtool("check", "config", "prometheus.yml", cwd=PROM)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 rule files found" in r.stdout + r.stderr


def test_promtool_rule_unit_tests() -> None:
    r = promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_every_alert_has_runbook_and_both_test_cases() -> None:
    blocks = alert_blocks()
    assert set(blocks) >= {
        "AigwDown",
        "AigwJobsFailing",
        "AigwDeadLetterGrowing",
        "AigwSendBacklog",
        "AigwDataDirSpaceLow",
        "AigwDataDirFillingUp",
        "AigwNoInstancesReceived",
        "AigwPipelineUnavailable",
        "AigwGpuMissing",
    }
    tests = ALERT_TESTS.read_text()
    for name, block in blocks.items():
        for key in ("summary:", "description:", "runbook:", "severity:"):
            assert key in block, f"{name}: no {key}"
        runbook = block.split("runbook:", 1)[1]
        assert "`aigw " in runbook, f"{name}: the runbook names no aigw command"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts: \[\]", tests), f"{name}: no not-firing test case"
        assert re.search(rf"alertname: {name}\n\s+exp_alerts:\n\s+- exp_labels", tests), f"{name}: no firing case"


def test_alert_rules_name_only_exported_metrics() -> None:
    names = exported_names()
    # The silence alert counts from the process start when nothing was received yet.
    assert "process_start_time_seconds" in names
    used = set(_AIGW_NAME.findall(ALERTS.read_text())) | set(_AIGW_NAME.findall(ALERT_TESTS.read_text()))
    assert used, "no aigw_ metric found in the rules"
    assert used <= names, f"not exported by the gateway: {sorted(used - names)}"


# ----------------------------------------------------------------- Grafana
def test_dashboard_names_only_exported_metrics() -> None:
    exprs = dashboard_exprs()
    used = {n for e in exprs for n in _AIGW_NAME.findall(e)}
    names = exported_names()
    assert used <= names, f"dashboard metrics not exported by the gateway: {sorted(used - names)}"
    # The panels the operations issue asks for.
    assert used >= {
        "aigw_instances_received_total",
        "aigw_series_completed_total",
        "aigw_jobs_queued",
        "aigw_jobs_running",
        "aigw_job_duration_seconds_bucket",
        "aigw_inference_duration_seconds_bucket",
        "aigw_send_attempts_total",
        "aigw_deadletter_size",
        "aigw_data_dir_free_bytes",
        "aigw_gpu_utilization_ratio",
        "aigw_gpu_memory_used_bytes",
        "aigw_pipeline_available",
    }


def test_dashboard_structure() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 39
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
    for f in (PROVISIONING / "datasources" / "aigw.yml", PROVISIONING / "dashboards" / "aigw.yml"):
        assert f.read_text().count("apiVersion: 1") == 1, f


def test_dashboard_expressions_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses every expression of a rules file: give it the dashboard's
    # queries as recording rules, with Grafana's variables filled in.
    exprs = [e.replace("$__rate_interval", "5m").replace("$instance", ".*") for e in dashboard_exprs()]
    exprs = [e for e in exprs if not e.startswith("label_values(")]  # Grafana's own function, not PromQL
    rules = "groups:\n  - name: dashboard\n    rules:\n" + "".join(
        f"      - record: aigw_dashboard_check_{i}\n        expr: {json.dumps(e)}\n" for i, e in enumerate(exprs)
    )
    (tmp_path / "dashboard_rules.yml").write_text(rules)
    r = promtool("check", "rules", "dashboard_rules.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- GPU (NVML)
class FakeNvml:
    """pynvml's API over a list of devices; a device given as None does not answer."""

    class NVMLError(Exception):
        pass

    def __init__(self, devices: list[tuple[int, int, int] | None], init_error: Exception | None = None) -> None:
        self.devices = devices  # (utilisation %, memory used, memory total)
        self.init_error = init_error
        self.init_calls = 0

    def nvmlInit(self) -> None:  # noqa: N802 - pynvml's names
        self.init_calls += 1
        if self.init_error is not None:
            raise self.init_error

    def nvmlDeviceGetCount(self) -> int:  # noqa: N802
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:  # noqa: N802
        if self.devices[index] is None:
            raise self.NVMLError("GPU is lost")
        return index

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:  # noqa: N802
        d = self.devices[handle]
        assert d is not None
        return SimpleNamespace(gpu=d[0], memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:  # noqa: N802
        d = self.devices[handle]
        assert d is not None
        return SimpleNamespace(used=d[1], total=d[2], free=d[2] - d[1])


def scrape(collector: GpuCollector) -> dict[str, float]:
    """Sample name with labels -> value, as a scrape would see them."""
    registry = CollectorRegistry()
    registry.register(collector)
    out = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_gpu_metrics_from_nvml() -> None:
    nvml = FakeNvml([(37, 2 * 1024**3, 80 * 1024**3), (0, 0, 24 * 1024**3)])
    samples = scrape(GpuCollector(nvml))
    assert samples == {
        "aigw_gpu_devices": 2,
        'aigw_gpu_utilization_ratio{gpu="0"}': 0.37,
        'aigw_gpu_utilization_ratio{gpu="1"}': 0.0,
        'aigw_gpu_memory_used_bytes{gpu="0"}': 2 * 1024**3,
        'aigw_gpu_memory_used_bytes{gpu="1"}': 0,
        'aigw_gpu_memory_total_bytes{gpu="0"}': 80 * 1024**3,
        'aigw_gpu_memory_total_bytes{gpu="1"}': 24 * 1024**3,
    }


def test_gpu_values_follow_each_scrape() -> None:
    nvml = FakeNvml([(10, 1, 100)])
    collector = GpuCollector(nvml)
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("aigw_gpu_utilization_ratio", {"gpu": "0"}) == pytest.approx(0.10)
    nvml.devices = [(90, 50, 100)]
    assert registry.get_sample_value("aigw_gpu_utilization_ratio", {"gpu": "0"}) == pytest.approx(0.90)
    assert registry.get_sample_value("aigw_gpu_memory_used_bytes", {"gpu": "0"}) == 50
    assert nvml.init_calls == 1, "NVML is initialised once per process, not per scrape"


def test_gpu_that_stops_answering_is_not_counted(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([(50, 1, 100), None])
    collector = GpuCollector(nvml)
    with caplog.at_level(logging.INFO, logger="gateway._gpu"):
        for _ in range(3):
            samples = scrape(collector)
        assert samples["aigw_gpu_devices"] == 1
        assert 'aigw_gpu_utilization_ratio{gpu="1"}' not in samples
        assert sum("GPU 1 does not answer" in r.message for r in caplog.records) == 1, "logged once, not per scrape"
        nvml.devices[1] = (5, 1, 100)
        assert scrape(collector)["aigw_gpu_devices"] == 2
        assert any("GPU 1 answers NVML queries again" in r.message for r in caplog.records)


def test_gpu_label_is_bounded() -> None:
    samples = scrape(GpuCollector(FakeNvml([(1, 1, 1)] * (MAX_GPUS + 8))))
    assert samples["aigw_gpu_devices"] == MAX_GPUS
    assert sum(k.startswith("aigw_gpu_memory_total_bytes{") for k in samples) == MAX_GPUS


def test_no_nvml_library_reports_zero_gpus_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    # What pynvml raises on a machine without the NVIDIA driver (libnvidia-ml.so.1 missing).
    nvml = FakeNvml([], init_error=FakeNvml.NVMLError("NVML Shared Library Not Found"))
    collector = GpuCollector(nvml)
    with caplog.at_level(logging.INFO, logger="gateway._gpu"):
        for _ in range(3):
            assert scrape(collector) == {"aigw_gpu_devices": 0}
    notes = [r for r in caplog.records if "no GPU metrics" in r.message]
    assert len(notes) == 1 and notes[0].levelno == logging.INFO
    assert nvml.init_calls == 1


def test_no_pynvml_module_reports_zero_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert scrape(GpuCollector()) == {"aigw_gpu_devices": 0}


def test_real_pynvml_never_fails_a_scrape() -> None:
    # On this machine (no NVIDIA driver) this is the no-GPU path through the real pynvml;
    # on a GPU machine it reads the real devices.
    import pynvml  # noqa: F401 - the dependency must be installed

    metrics = Metrics(CollectorRegistry())
    generate_latest(metrics.registry)
    devices = metrics.registry.get_sample_value("aigw_gpu_devices")
    assert devices is not None and devices >= 0
    if not Path("/dev/nvidiactl").exists():
        assert devices == 0


# ------------------------------------------------------ site expectations
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 0),
        ({"models.providers": ["CPUExecutionProvider"]}, 0),
        ({"models.providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}, 1),
        ({"models.providers": ["TensorrtExecutionProvider"]}, 1),
        ({"metrics.expect_gpu": True}, 1),
        ({"metrics.expect_gpu": False, "models.providers": ["CUDAExecutionProvider"]}, 0),
    ],
)
def test_gpu_expected_from_configuration(overrides: dict[str, Any], expected: int) -> None:
    metrics = Metrics(CollectorRegistry(), nvml=FakeNvml([]))
    metrics.configure(load_config(overrides=overrides, environ={}))
    assert metrics.registry.get_sample_value("aigw_gpu_expected") == expected


def test_silence_and_watermark_from_configuration() -> None:
    metrics = Metrics(CollectorRegistry(), nvml=FakeNvml([]))
    assert metrics.registry.get_sample_value("aigw_expected_max_silence_seconds") == 0  # default: alert off
    cfg = load_config(
        overrides={"metrics.max_silence_seconds": 3600, "gateway.min_free_bytes": 5 * 1024**3}, environ={}
    )
    metrics.configure(cfg)
    assert metrics.registry.get_sample_value("aigw_expected_max_silence_seconds") == 3600
    assert metrics.registry.get_sample_value("aigw_data_dir_min_free_bytes") == 5 * 1024**3
