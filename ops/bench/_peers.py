"""DICOM peers for the benchmarks: the gateway, DCMTK's storescp and storescu,
and a do-nothing pynetdicom SCP (``_null_scp.py``).

Every peer is a subprocess on loopback (127.0.0.1), on a free port, with its
own folder under a temporary work dir, and is ended by the code that started
it (its own process group, so storescp's forked children go with it).

DCMTK is found by asking each candidate on ``PATH`` for ``--version``: the
virtualenv's ``bin/`` also holds pynetdicom's example apps under the same
names (``storescu``, ``storescp``, ``echoscu``), and those are not DCMTK.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from gateway.apps.viewer._tools import free_port

__all__ = [
    "DCMTK_ENV",
    "BenchError",
    "GatewayPeer",
    "PynetdicomPeer",
    "SendResult",
    "StorescpPeer",
    "count_files",
    "cpu_seconds",
    "dcmtk",
    "descendants",
    "free_port",
    "send_parallel",
    "vm_kib",
]

HOST = "127.0.0.1"
#: Calling AE title of the benchmark's storescu processes.
BENCH_AE = "AIGWBENCH"


#: Environment of every DCMTK process. Since DCMTK 3.6.2 its sockets keep
#: Nagle's algorithm unless TCP_NODELAY=1 is set (DCMTK's envvars.txt); with
#: Nagle, storescp stalls on delayed ACKs (about 40 ms per instance on Linux
#: loopback), which measures the kernel's timers, not the receiver.
DCMTK_ENV: dict[str, str] = {"TCP_NODELAY": "1"}


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, **DCMTK_ENV}


class BenchError(RuntimeError):
    """The benchmark run itself failed (a peer did not start, a send failed)."""


@cache
def dcmtk(tool: str) -> str:
    """Path of the DCMTK binary ``tool`` (not a same-named pynetdicom app)."""
    seen: list[str] = []
    for folder in os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin", "/usr/local/bin"]:
        cand = Path(folder or ".") / tool
        if not (cand.is_file() and os.access(cand, os.X_OK)) or str(cand) in seen:
            continue
        seen.append(str(cand))
        try:
            out = subprocess.run([str(cand), "--version"], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "dcmtk" in (out.stdout + out.stderr).lower():
            return str(cand)
    raise BenchError(f"DCMTK {tool} not found on PATH (candidates that are not DCMTK: {seen or 'none'})")


def dcmtk_version() -> str:
    out = subprocess.run([dcmtk("storescu"), "--version"], capture_output=True, text=True, timeout=10)
    return next((ln.strip("$ ") for ln in out.stdout.splitlines() if "dcmtk" in ln.lower()), "unknown")


def echo(port: int, called_ae: str, timeout: int = 2) -> bool:
    """C-ECHO with DCMTK's echoscu; True when the peer answered."""
    cmd = [dcmtk("echoscu"), "-aet", BENCH_AE, "-aec", called_ae, "-to", str(timeout), HOST, str(port)]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=timeout + 10, env=dcmtk_env()).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def count_files(root: Path, pattern: str = "*") -> int:
    """Number of regular files matching ``pattern`` anywhere under ``root``."""
    return sum(1 for p in root.rglob(pattern) if p.is_file()) if root.exists() else 0


def vm_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise BenchError(f"/proc/{pid}/status has no {field}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children ...) that runs now."""
    out: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class _Peer:
    """A receiver subprocess in its own process group."""

    name = "peer"
    called_ae = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def stored(self) -> int:
        """Instances the peer has written to disk so far."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dcmtk_env()

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the peer's own process (None where it forks per association)."""
        return cpu_seconds(self.pid)

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise BenchError(f"{self.name} is not running")
        return self.proc.pid

    def start(self, timeout: float = 90.0) -> _Peer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.workdir,
                env=self.environment(),
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start:\n{_tail(self.log)}")
            if echo(self.port, self.called_ae):
                return self
            time.sleep(0.2)
        raise BenchError(f"{self.name} did not answer C-ECHO within {timeout:.0f} s:\n{_tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM the peer's process group, SIGKILL it after 15 s."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                # The group may outlive its leader (forked storescp children).
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue
            break
        if proc.poll() is None:
            proc.wait(timeout=5)

    def log_tail(self) -> str:
        return _tail(self.log)


def aigw_command() -> list[str]:
    """How to run ``aigw``: the console script next to this Python, else ``-m gateway``."""
    script = Path(sys.executable).parent / "aigw"
    if script.is_file():
        return [str(script)]
    found = shutil.which("aigw")
    return [found] if found else [sys.executable, "-m", "gateway"]


class GatewayPeer(_Peer):
    """``aigw serve`` with a fresh data dir; without ``config`` no destinations, so results stay in the outbox."""

    name = "aigw"
    called_ae = "AIGW"

    def __init__(
        self, workdir: Path, series_timeout: float = 5.0, config: Path | None = None, listener_processes: int = 1
    ) -> None:
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        self.series_timeout = series_timeout
        self.config = config
        self.listener_processes = listener_processes
        if listener_processes > 1:
            if config is not None:
                raise BenchError("GatewayPeer: listener_processes needs the peer's own configuration")
            self.config = workdir / "aigw.toml"
            self.config.write_text(f"[gateway]\nlistener_processes = {listener_processes}\n")

    def start(self, timeout: float = 90.0) -> _Peer:
        super().start(timeout)
        # The gateway's own listener answers C-ECHO before its other listener
        # processes have finished starting; their start-up (imports) must not
        # fall into the timed window, nor compete with it for the cores.
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if len(re.findall(r"listener process \d+ \(pid \d+\) on port", _tail(self.log, 10_000))) >= (
                self.listener_processes - 1
            ):
                return self
            time.sleep(0.2)
        raise BenchError(f"{self.name}: listener processes not up within {timeout:.0f} s:\n{_tail(self.log)}")

    def cpu_seconds(self) -> float | None:
        """CPU of the gateway process and of its listener processes."""
        total = 0.0
        for pid in [self.pid, *descendants(self.pid)]:
            try:
                total += cpu_seconds(pid)
            except OSError:  # ended meanwhile
                pass
        return total

    def command(self) -> list[str]:
        return [
            *aigw_command(),
            "serve",
            "--host", HOST,
            "--port", str(self.port),
            "--ae-title", self.called_ae,
            "--data-dir", str(self.data_dir),
            "--metrics-port", "0",
            "--series-timeout", str(self.series_timeout),
            *(["--config", str(self.config)] if self.config else []),
        ]  # fmt: skip

    def stored(self) -> int:
        return count_files(self.data_dir / "store", "*.dcm")

    def environment(self) -> dict[str, str]:
        # AIGW_* variables would override the flags (a database URL, a
        # watermark): the benchmark's gateway uses only its defaults.
        return {k: v for k, v in os.environ.items() if not k.startswith("AIGW_")}


class StorescpPeer(_Peer):
    """DCMTK ``storescp`` forking one child per association, writing bit-preserving files."""

    name = "storescp"
    called_ae = "STORESCP"
    #: The options the benchmark gives storescp (printed with the results).
    OPTIONS = ("--fork", "--bit-preserving", "--max-pdu", "131072", "-fe", ".dcm")

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out_dir = workdir / "out"
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [dcmtk("storescp"), "-aet", self.called_ae, *self.OPTIONS, "-od", str(self.out_dir), str(self.port)]

    def stored(self) -> int:
        return count_files(self.out_dir)

    def cpu_seconds(self) -> float | None:
        return None  # the work happens in forked children


class PynetdicomPeer(_Peer):
    """The floor under any pynetdicom receiver: ``_null_scp.py`` (rename and answer, nothing else)."""

    name = "pynetdicom"
    called_ae = "NULLSCP"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out_dir = workdir / "out"

    def command(self) -> list[str]:
        script = Path(__file__).resolve().parent / "_null_scp.py"
        return [sys.executable, str(script), str(self.port), self.called_ae, str(self.out_dir)]

    def stored(self) -> int:
        return count_files(self.out_dir)


#: Options the benchmark gives every storescu: propose only the contexts the
#: files need (-R), go on after a refused instance (-nh) so the count shows it.
STORESCU_OPTIONS = ("-R", "-nh")


@dataclass
class SendResult:
    seconds: float
    returncodes: list[int]
    logs: list[Path]

    @property
    def ok(self) -> bool:
        return all(rc == 0 for rc in self.returncodes)

    def failure(self) -> str:
        parts = []
        for rc, log in zip(self.returncodes, self.logs):
            if rc != 0:
                parts.append(f"storescu exit {rc} ({log.name}):\n{_tail(log, 10)}")
        return "\n".join(parts)


def send_parallel(
    port: int, called_ae: str, groups: Sequence[Sequence[Path]], logdir: Path, timeout: float = 900.0
) -> SendResult:
    """Send each group of files over its own association, all groups at once.

    One ``storescu`` process per group, all started together; the time runs
    from the start of the first process to the exit of the last.
    """
    logdir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []
    handles = []
    try:
        t0 = time.perf_counter()
        for k, files in enumerate(groups):
            log = logdir / f"storescu-{k}.log"
            fh = open(log, "wb")
            handles.append(fh)
            logs.append(log)
            cmd = [dcmtk("storescu"), "-aet", BENCH_AE, "-aec", called_ae, *STORESCU_OPTIONS, HOST, str(port)]
            procs.append(
                subprocess.Popen([*cmd, *map(str, files)], stdout=fh, stderr=subprocess.STDOUT, env=dcmtk_env())
            )
        end = time.monotonic() + timeout
        for p in procs:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
        seconds = time.perf_counter() - t0
        return SendResult(seconds, [p.returncode for p in procs], logs)
    except subprocess.TimeoutExpired:
        raise BenchError(f"storescu did not finish within {timeout:.0f} s") from None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in handles:
            fh.close()
