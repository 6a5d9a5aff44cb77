"""Monitoring against a real Prometheus server that scrapes a running gateway."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, GatewayProcess, free_port, http_get, mr_series, need, storescu, wait_for

pytestmark = pytest.mark.peers


def test_prometheus_scrapes_gateway_metrics(tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    gw = make_gateway()
    assert storescu(gw.port, mr_series(tmp_path / "s", n=2)).returncode == 0
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: aigw\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gw.metrics_port}']\n"
    )
    proc = subprocess.Popen(
        [need("prometheus"), f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )

    def query(expr: str) -> list[dict[str, Any]]:  # Prometheus's JSON
        code, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}")
        return list(json.loads(body)["data"]["result"]) if code == 200 else []

    try:
        wait_for(lambda: query('up{job="aigw"} == 1'), 60, "Prometheus to scrape the gateway")
        stored = wait_for(lambda: query('aigw_instances_received_total{outcome="stored"} == 2'), 30, "ingest metric")
        assert stored[0]["metric"]["outcome"] == "stored"
        assert wait_for(lambda: query('aigw_jobs_total{pipeline="test-invert",outcome="succeeded"} == 1'), 30, "job")
        for name in ("aigw_build_info", "aigw_data_dir_free_bytes", "aigw_deadletter_size", "aigw_jobs_queued",
                     "aigw_job_duration_seconds_bucket", "aigw_pipeline_available"):
            assert query(name), f"{name} not scraped"
        # No UID or patient attribute ever becomes a label value.
        code, body = http_get(f"http://127.0.0.1:{port}/api/v1/label/__name__/values")
        names = json.loads(body)["data"]
        for n in (x for x in names if x.startswith("aigw_")):
            for series in query(n):
                for value in series["metric"].values():
                    assert not str(value).startswith(("1.2.", "2.25.")), (n, value)
    finally:
        proc.terminate()
        proc.wait(10)


def test_prometheus_loads_alert_rules(tmp_path: Path, make_gateway: Callable[..., GatewayProcess]) -> None:
    """ops/prometheus/alerts.yml loads into a real Prometheus and every rule evaluates cleanly on live data."""
    alerts = REPO / "ops" / "prometheus" / "alerts.yml"
    gw = make_gateway(gateway={"min_free_bytes": 12345})
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {json.dumps(str(alerts))}\n"
        "scrape_configs:\n  - job_name: aigw\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{gw.metrics_port}']\n"
    )
    proc = subprocess.Popen(
        [
            need("prometheus"),
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "wb"),
    )

    def api(path: str) -> dict[str, Any]:  # Prometheus's JSON
        code, body = http_get(f"http://127.0.0.1:{port}/api/v1/{path}")
        return dict(json.loads(body)["data"]) if code == 200 else {}

    def query(expr: str) -> object:
        return api("query?query=" + urllib.parse.quote(expr)).get("result")

    def rules() -> list[dict[str, Any]]:
        return [r for g in api("rules").get("groups", []) for r in g["rules"]]

    try:
        wait_for(lambda: query('up{job="aigw"} == 1'), 60, "Prometheus to scrape the gateway")
        # Health stays "unknown" until a rule has been evaluated on scraped data.
        loaded = wait_for(lambda: (rs := rules()) and all(r["health"] != "unknown" for r in rs) and rs, 60, "rules")
        expected = set(re.findall(r"^\s+- alert: (\w+)$", alerts.read_text(), flags=re.M))
        assert {r["name"] for r in loaded} == expected
        for r in loaded:
            assert r["health"] == "ok", (r["name"], r.get("lastError"))
        # `aigw serve` exports the configured thresholds that the rules compare against.
        assert query("aigw_data_dir_min_free_bytes == 12345")
    finally:
        proc.terminate()
        proc.wait(10)
