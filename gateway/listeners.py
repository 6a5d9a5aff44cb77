"""More listener processes on the DICOM ports: ingest on every core.

One Python process receives on one core at most (the GIL), however many
associations it serves. With ``[gateway] listener_processes = N`` (or
``"auto"``, one per core) the gateway process starts N - 1 more processes
that each run the whole receive path, front door to index, on the same ports:
every one binds with ``SO_REUSEPORT`` and the kernel spreads new connections
over them. What they share is what already makes ingest safe across
processes:

* the data dir and the index: arrival rows are written in write transactions
  (SQLite ``BEGIN IMMEDIATE`` in WAL mode, or PostgreSQL), and one UID's
  critical section is locked across processes (:class:`gateway.ingest.Ingest`);
* the configuration: each process gets the same :class:`~gateway.config.Config`
  object;
* the caps ``max_associations``, ``max_connections`` and
  ``max_connections_per_address``, which hold for all processes together: each
  counts what it holds in a table in shared memory (:mod:`gateway.slots`), since
  the kernel never spreads connections evenly;
* the release and abort hints, which are index writes.

Completion, jobs, sends, DICOMweb and the metrics endpoint stay in the gateway
process, single owners as before. Each listener process serves its own
registry on a loopback port behind a bearer token that only the gateway
knows; the gateway's ``/metrics`` adds their samples to its own
(:func:`gateway.metrics.merge_expositions`).

:class:`ListenerPool` supervises them: a process that dies (kill -9, a crash)
is logged and started again with backoff, and every open series gets the
abort grace period first, since its associations were cut; its row of the
caps table is cleared. A listener
process ends itself when the gateway process goes, however that ended.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import secrets
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from typing import TYPE_CHECKING, Any

from gateway.config import Config, GatewaySettings
from gateway.slots import Caps, Slots, SlotTable

if TYPE_CHECKING:
    from gateway.index import Index
    from gateway.ingest import Ingest
    from gateway.metrics import Metrics
    from gateway.scp import StorageSCP
    from gateway.storage import DataDir

__all__ = ["ListenerPool", "receive_path"]

log = logging.getLogger(__name__)

#: Longest wait between two restarts of a listener process that keeps dying.
_MAX_BACKOFF = 30.0


def receive_path(
    config: Config,
    gateway: GatewaySettings,
    data: DataDir,
    index: Index,
    metrics: Metrics,
    quiet_seconds: Callable[[dict[str, Any], str], float],
    slots: Slots | None = None,
) -> tuple[Ingest, StorageSCP]:
    """The ingest and the DIMSE listener of one process, the gateway's or a listener process's.

    ``gateway`` is ``config.gateway`` with this process's ports; ``slots`` its
    row of the caps table the listener processes share (none: one process).
    """
    from gateway.config import LatePolicy
    from gateway.ingest import Ingest
    from gateway.scp import StorageSCP

    c = config.completion
    ingest = Ingest(
        gateway,
        data,
        index,
        metrics,
        quiet_seconds=quiet_seconds,
        hint_quiet_seconds=c.hint_quiet_seconds,
        reprocess_late=c.late_instances == LatePolicy.REPROCESS,
    )
    scp = StorageSCP(
        gateway,
        data,
        index,
        metrics,
        release_quiet_seconds=c.release_quiet_seconds if c.release_hint else None,
        ingest=ingest,
        abort_grace_seconds=c.abort_grace_seconds,
        slots=slots,
    )
    return ingest, scp


@dataclass
class _Child:
    number: int
    process: BaseProcess
    metrics_port: int | None = None
    started: float = 0.0


class ListenerPool:
    """The extra listener processes of one gateway: started, watched, restarted, stopped.

    Parameters
    ----------
    config : Config
        The gateway's configuration; the processes bind ``port`` and ``tls_port``.
    on_lost : callable
        Called (with the process number) when a listener process died: its
        associations were cut, so open series must wait for their senders.
    """

    def __init__(self, config: Config, on_lost: Any) -> None:
        self.config = config
        self.count = config.gateway.listener_count() - 1
        self._on_lost = on_lost
        self._token = secrets.token_urlsafe(32)
        self._ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
        self._children: dict[int, _Child] = {}
        self._backoff: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="aigw-listeners", daemon=True)
        self._ports: tuple[int, int | None] = (0, None)
        #: What every listener process holds, the gateway's own listener as row 0.
        self.table = SlotTable(
            Caps.from_settings(config.gateway),
            self.count + 1,
            lock_path=config.gateway.data_dir / "locks" / "listener-slots.lock",
        )

    def start(self, port: int, tls_port: int | None) -> None:
        """Start the processes on the ports the gateway's own listener bound."""
        self._ports = (port, tls_port)
        for number in range(1, self.count + 1):
            self._spawn(number)
        self._thread.start()
        log.info("%d more listener process(es) on port %d (SO_REUSEPORT)", self.count, port)

    def stop(self) -> None:
        """End every listener process (SIGTERM, then SIGKILL after 10 s)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            children = list(self._children.values())
        for child in children:
            if child.process.is_alive():
                child.process.terminate()
        for child in children:
            child.process.join(10)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(5)

    def alive(self) -> bool:
        """Whether every listener process runs (readiness)."""
        with self._lock:
            return len(self._children) == self.count and all(c.process.is_alive() for c in self._children.values())

    def pids(self) -> list[int]:
        with self._lock:
            return [c.process.pid for c in self._children.values() if c.process.pid is not None]

    def expositions(self) -> list[bytes]:
        """Each live listener process's metrics, in the text format (a process that does not answer is left out)."""
        with self._lock:
            ports = [c.metrics_port for c in self._children.values() if c.metrics_port and c.process.is_alive()]
        out = []
        for port in ports:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {self._token}"}
            )
            try:
                with urllib.request.urlopen(req, timeout=2) as r:
                    out.append(r.read())
            except OSError as exc:
                log.debug("listener process metrics on port %d: %s", port, exc)
        return out

    # ----------------------------------------------------------------- inside
    def _spawn(self, number: int) -> None:
        parent, child_end = self._ctx.Pipe(duplex=False)
        proc = self._ctx.Process(
            target=_listener_main,
            args=(
                self.config,
                number,
                self._ports,
                hashlib.sha256(self._token.encode()).hexdigest(),
                child_end,
                self.table,
            ),
            name=f"aigw-listener-{number}",
            daemon=False,
        )
        proc.start()
        child_end.close()
        child = _Child(number, proc, started=time.monotonic())
        # The process says its metrics port once it listens; until then (or if it fails) it has none.
        if parent.poll(60):
            try:
                child.metrics_port = int(parent.recv())
            except (EOFError, OSError, ValueError):
                pass
        parent.close()
        with self._lock:
            self._children[number] = child

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                dead = [c for c in self._children.values() if not c.process.is_alive()]
            for child in dead:
                if self._stop.is_set():
                    return
                code = child.process.exitcode
                log.warning("listener process %d (pid %s) ended with %s; starting it again", child.number,
                            child.process.pid, code)
                try:
                    self._on_lost(child.number)
                except Exception:
                    log.exception("re-arming open series after a lost listener failed")
                # Its connections died with it: their slots are free for the other processes.
                self.table.clear(child.number)
                # A process that keeps dying at once waits longer each time.
                lived = time.monotonic() - child.started
                wait = 0.0 if lived > 60 else min(_MAX_BACKOFF, max(1.0, 2 * self._backoff.get(child.number, 0.5)))
                self._backoff[child.number] = wait
                if wait and self._stop.wait(wait):
                    return
                self._spawn(child.number)


def _listener_main(
    config: Config, number: int, ports: tuple[int, int | None], token_sha256: str, ready: Any, table: SlotTable
) -> None:
    """A listener process: the receive path on the shared ports until told to stop or the gateway is gone."""
    from gateway import _logging
    from gateway.config import MetricsAuth, MetricsSettings
    from gateway.index import Index
    from gateway.metrics import Metrics, MetricsServer
    from gateway.routing import Router
    from gateway.storage import DataDir

    _logging.configure(config.logging.level, config.logging.format, config.logging.third_party_level)
    port, tls_port = ports
    gw = config.gateway.model_copy(update={"port": port})
    if gw.tls is not None and tls_port is not None:
        gw = gw.model_copy(update={"tls": gw.tls.model_copy(update={"port": tls_port})})
    data = DataDir(gw.data_dir)
    index = Index(config.database_url)
    metrics = Metrics()
    # Only the routes' header conditions matter here (quiet periods); pipelines run elsewhere.
    router = Router(config.routes, {}, {}, default_quiet_seconds=config.completion.series_timeout_seconds)
    table.clear(number)  # a restarted process starts with nothing held
    ingest, scp = receive_path(config, gw, data, index, metrics, router.quiet_seconds, table.row(number))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the gateway decides
    ingest.start()
    scp.start()
    http = MetricsServer(
        metrics,
        "127.0.0.1",
        0,
        lambda: {"listener": scp.is_up},
        settings=MetricsSettings(auth=MetricsAuth.BEARER, credential_sha256=token_sha256),
    )
    http.start()
    log.info("listener process %d (pid %d) on port %d", number, os.getpid(), scp.port)
    ready.send(http.port)
    ready.close()
    # The gateway process's end, however it came (kill -9 included), ends this one.
    gateway = multiprocessing.parent_process()
    sentinel = [gateway.sentinel] if gateway is not None else []
    while not done.is_set():
        if sentinel and multiprocessing.connection.wait(sentinel, timeout=0.5):
            log.warning("listener process %d: the gateway process is gone; stopping", number)
            break
        if not sentinel:
            done.wait(0.5)
    scp.stop()
    ingest.stop()
    http.stop()
    index.close()
