"""The HTTP endpoint (/metrics, /healthz, /readyz) under abuse: slow clients, floods, scrape loops, credentials."""

from __future__ import annotations

import base64
import hashlib
import json
import select
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import MetricsSettings, load_config
from gateway.metrics import Metrics, MetricsServer, Throttled
from gateway.service import Gateway
from tests.conftest import GatewayProcess, free_port, http_get, need, wait_for

TOKEN = "s3cret-token-for-tests"
TOKEN_SHA256 = hashlib.sha256(TOKEN.encode()).hexdigest()


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def half_sent(port: int, n: int) -> list[socket.socket]:
    """``n`` connections that each send a request head without its final blank line, then wait."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: aigw\r\n")
        socks.append(s)
    return socks


def closed_by_peer(s: socket.socket, wait: float) -> bool:
    readable, _, _ = select.select([s], [], [], wait)
    if not readable:
        return False
    try:
        return s.recv(1) == b""
    except OSError:  # reset
        return True


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[MetricsServer, list[float]]]:
    """An in-process endpoint with the ``[metrics]`` settings given as the parameter; the list records refreshes."""
    settings = MetricsSettings(**getattr(request, "param", {}))
    refreshed: list[float] = []
    srv = MetricsServer(
        Metrics(),
        "127.0.0.1",
        0,
        lambda: {"database": True},
        refresh=lambda: refreshed.append(time.monotonic()),
        settings=settings,
    )
    srv.start()
    try:
        yield srv, refreshed
    finally:
        srv.stop()


def test_half_sent_requests_neither_block_a_scrape_nor_cost_threads(
    make_gateway: Callable[..., GatewayProcess],
) -> None:
    gw = make_gateway()
    assert gw.proc is not None
    url = f"http://127.0.0.1:{gw.metrics_port}/metrics"
    assert http_get(url)[0] == 200
    before = threads_of(gw.proc.pid)
    socks = half_sent(gw.metrics_port, 300)
    try:
        started = time.monotonic()
        code, body = http_get(url, timeout=5)
        elapsed = time.monotonic() - started
        assert code == 200 and b"aigw_build_info" in body
        assert elapsed < 1.0, f"a scrape took {elapsed:.2f} s behind 300 half-sent requests"
        during = threads_of(gw.proc.pid)
        # The answering pool starts its threads lazily, up to 4; nothing grows per connection.
        assert during - before <= MetricsServer._WORKERS, (before, during)
        # Beyond the cap (32) the oldest waiting connections were closed, not kept.
        closed = sum(closed_by_peer(s, 0.05) for s in socks)
        assert closed >= 300 - MetricsSettings().max_connections, closed
        assert http_get(f"http://127.0.0.1:{gw.metrics_port}/healthz")[0] == 200
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("server", [dict(read_timeout_seconds=0.5)], indirect=True)
def test_a_request_not_finished_in_time_is_closed(server: tuple[MetricsServer, list[float]]) -> None:
    srv, _ = server
    (s,) = half_sent(srv.port, 1)
    started = time.monotonic()
    try:
        assert closed_by_peer(s, 5)
        assert 0.4 <= time.monotonic() - started < 2.5
    finally:
        s.close()


@pytest.mark.parametrize("server", [dict(max_connections=4)], indirect=True)
def test_over_the_cap_the_oldest_waiting_connection_makes_room(server: tuple[MetricsServer, list[float]]) -> None:
    srv, _ = server
    socks = half_sent(srv.port, 6)
    try:
        time.sleep(0.3)
        assert [closed_by_peer(s, 0.2) for s in socks] == [True, True, False, False, False, False]
        assert http_get(f"http://127.0.0.1:{srv.port}/metrics")[0] == 200
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("request_head", [b"GARBAGE\r\n\r\n", b"GET /metrics\r\n\r\n", b"\r\n\r\n"])
def test_malformed_requests_get_400(server: tuple[MetricsServer, list[float]], request_head: bytes) -> None:
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(request_head)
        assert s.recv(4096).startswith(b"HTTP/1.1 400 ")


def test_post_gets_405(server: tuple[MetricsServer, list[float]]) -> None:
    srv, _ = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("server", [dict(cache_seconds=0.5)], indirect=True)
def test_refresh_runs_at_most_once_per_cache_period(server: tuple[MetricsServer, list[float]]) -> None:
    srv, refreshed = server
    started = time.monotonic()
    scrapes = 0
    while time.monotonic() - started < 1.6:
        assert http_get(f"http://127.0.0.1:{srv.port}/metrics")[0] == 200
        scrapes += 1
    assert scrapes > 20, "too few scrapes to tell"
    # At most one refresh per started period (0, 0.5, 1.0, 1.5 s), and never closer than the period.
    assert 3 <= len(refreshed) <= 4, (scrapes, len(refreshed))
    gaps = [b - a for a, b in zip(refreshed, refreshed[1:])]
    assert min(gaps) >= 0.5, gaps


@pytest.mark.parametrize(("path", "query"), [("/metrics", "counts"), ("/readyz", "ping")])
def test_a_gateway_scrape_or_probe_loop_queries_the_index_once_per_period(
    tmp_path: Path, models_dir: Path, monkeypatch: pytest.MonkeyPatch, path: str, query: str
) -> None:
    """The real wiring: the gauges and the readiness checks behind the cache, counting the index's query."""
    proc = GatewayProcess(tmp_path / "gw", models_dir)  # only its configuration: this gateway runs here
    cfg = load_config(proc.config)
    cfg.metrics.cache_seconds = 1.0
    gw = Gateway(cfg)
    calls: list[float] = []
    original = getattr(gw.index, query)

    def counting() -> Any:
        calls.append(time.monotonic())
        return original()

    monkeypatch.setattr(gw.index, query, counting)
    gw.start()
    try:
        at_start = len(calls)
        url = f"http://127.0.0.1:{gw.metrics_port}{path}"
        started = time.monotonic()
        scrapes = 0
        while time.monotonic() - started < 2.5:
            assert http_get(url)[0] == 200
            scrapes += 1
        from_scrapes = len(calls) - at_start
        assert scrapes > 20
        assert 1 <= from_scrapes <= 3, (scrapes, from_scrapes)  # periods starting at 0, 1 and 2 s
    finally:
        gw.stop()


# ----------------------------------------------------------------- credentials
def basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


@pytest.mark.parametrize("server", [dict(auth="bearer", credential_sha256=TOKEN_SHA256)], indirect=True)
def test_bearer_auth(server: tuple[MetricsServer, list[float]]) -> None:
    srv, refreshed = server
    url = f"http://127.0.0.1:{srv.port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, basic("x", TOKEN)):
        code, reply_headers, body = get(url + "/metrics", headers)
        assert code == 401 and b"aigw_" not in body, headers
        assert reply_headers["WWW-Authenticate"].startswith("Bearer ")
    assert not refreshed, "an unauthorised request must not reach the index"
    code, _, body = get(url + "/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and b"aigw_build_info" in body
    # Probes carry no credentials and stay open.
    assert get(url + "/healthz")[0] == 200 and get(url + "/readyz")[0] == 200


def test_basic_auth_with_a_secret_file(tmp_path: Path) -> None:
    secret = tmp_path / "metrics-password"
    settings = MetricsSettings(auth="basic", username="prom", credential_file=secret)
    srv = MetricsServer(Metrics(), "127.0.0.1", 0, lambda: {}, settings=settings)
    srv.start()
    url = f"http://127.0.0.1:{srv.port}/metrics"
    try:
        assert get(url, basic("prom", "pw1"))[0] == 401  # no file yet: nobody gets in
        secret.write_text("pw1\n")
        assert get(url, basic("prom", "pw1"))[0] == 200
        for headers in ({}, basic("prom", "pw2"), basic("other", "pw1"), {"Authorization": "Basic !!!"}):
            code, reply_headers, _ = get(url, headers)
            assert code == 401 and reply_headers["WWW-Authenticate"].startswith("Basic "), headers
        secret.write_text("pw2")  # rotated: applies at once
        assert get(url, basic("prom", "pw1"))[0] == 401 and get(url, basic("prom", "pw2"))[0] == 200
    finally:
        srv.stop()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"auth": "bearer"}, "exactly one of credential_sha256 and credential_file"),
        ({"auth": "basic", "credential_sha256": TOKEN_SHA256, "credential_file": "/x"}, "exactly one"),
        ({"auth": "bearer", "credential_sha256": TOKEN}, "64 hexadecimal digits"),
        ({"auth": "digest"}, "'none', 'basic' or 'bearer'"),
    ],
)
def test_bad_auth_settings_are_refused_at_load(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    from gateway.config import ConfigError

    path = tmp_path / "aigw.toml"
    path.write_text("[metrics]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in table.items()))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(path)


def test_prometheus_scrapes_with_a_bearer_token(
    tmp_path: Path, make_gateway: Callable[..., GatewayProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real Prometheus with ``authorization`` gets the metrics; with a wrong token the target is down."""
    token = tmp_path / "metrics-token"
    token.write_text(TOKEN + "\n")
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    monkeypatch.setenv("AIGW_METRICS_AUTH", "bearer")
    monkeypatch.setenv("AIGW_METRICS_CREDENTIAL_FILE", str(token))
    gw = make_gateway()
    assert http_get(f"http://127.0.0.1:{gw.metrics_port}/metrics")[0] == 401
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    target = f"      - targets: ['127.0.0.1:{gw.metrics_port}']\n"
    cfg.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n"
        "  - job_name: aigw\n    authorization:\n      type: Bearer\n"
        f"      credentials_file: {json.dumps(str(token))}\n"
        f"    static_configs:\n{target}"
        f"  - job_name: aigw-wrong\n    authorization:\n      credentials_file: {json.dumps(str(wrong))}\n"
        f"    static_configs:\n{target}"
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

    def query(expr: str) -> list[dict[str, Any]]:
        code, body = http_get(f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(expr)}")
        return list(json.loads(body)["data"]["result"]) if code == 200 else []

    try:
        wait_for(lambda: query('up{job="aigw"} == 1'), 60, "Prometheus to scrape the gateway with its token")
        assert wait_for(lambda: query('aigw_build_info{job="aigw"}'), 30, "the gateway's metrics")
        assert wait_for(lambda: query('up{job="aigw-wrong"} == 0'), 30, "the wrong token to be refused")
        assert not query('aigw_build_info{job="aigw-wrong"}')
    finally:
        proc.terminate()
        proc.wait(10)


def test_throttled_rests_after_a_failure_and_keeps_the_last_good_answer() -> None:
    now = [0.0]
    runs: list[float] = []

    def answer() -> float:
        runs.append(now[0])
        if now[0] == 10:
            raise RuntimeError("index down")
        return now[0]

    throttled = Throttled(answer, 5, -1.0, clock=lambda: now[0])
    assert throttled() == 0 and throttled() == 0
    now[0] = 4.9
    assert throttled() == 0
    now[0] = 5
    assert throttled() == 5
    now[0] = 10
    with pytest.raises(RuntimeError):
        throttled()
    now[0] = 12
    assert throttled() == 5, "within the rest after a failure: the last good answer"
    assert runs == [0, 5, 10]
