"""Throw-away PostgreSQL and RabbitMQ servers for the tests.

Like the tests' Orthanc (``gateway.apps.viewer.Orthanc``), each server is started
from the system's binaries in its own temp folder, listens only on
127.0.0.1 on free ports, and is removed with its data when stopped. The
machine's own services (5432, 5672, epmd at 4369), if any, are neither used
nor touched. ``ops/setup.sh test`` installs the packages (Debian's
``postgresql`` and ``rabbitmq-server``); the system services those packages
start at install are not needed.

Both classes are context managers; a server still running at interpreter
exit is stopped by an ``atexit`` hook.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self

from gateway.apps.viewer._tools import free_port

__all__ = ["ExternalServer", "PostgresServer", "RabbitMQServer", "Server", "ServiceError"]

SETUP_COMMAND = "ops/setup.sh test"


class ServiceError(RuntimeError):
    """A test server could not be found, started or stopped."""


class _Timeout(ServiceError):
    pass


class Server(Protocol):
    """What the tests use of a server: where to connect."""

    @property
    def url(self) -> str: ...


@dataclass(frozen=True)
class ExternalServer:
    """A server the tests did not start (``AIGW_TEST_PG_URL`` / ``AIGW_TEST_BROKER_URL``)."""

    url: str


def _wait(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise _Timeout(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _tail(path: Path, n: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _world_traversable(folder: Path) -> bool:
    """Whether every folder from / down to ``folder`` lets any user pass (o+x)."""
    return all(os.stat(p).st_mode & 0o001 for p in [folder, *folder.parents])


class _Service:
    """Temp folder, start/stop bookkeeping and the atexit safety net (one start per object)."""

    def __init__(self, prefix: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir=self._temp_parent()))
        self.started_in: float | None = None  # seconds the last start took
        self._running = False
        self._owner = os.getpid()  # a forked child's exit must not stop the parent's server
        atexit.register(self.stop)

    def _temp_parent(self) -> str | None:
        return None  # tempfile's default ($TMPDIR or /tmp)

    def start(self) -> Self:
        t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._running = True
        self.started_in = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """Stop the server and remove its folder; safe to call more than once."""
        if os.getpid() != self._owner:
            return
        try:
            self._stop()
        finally:
            self._running = False
            shutil.rmtree(self.root, ignore_errors=True)
            atexit.unregister(self.stop)

    def _start(self) -> None:
        raise NotImplementedError

    def _stop(self) -> None:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self if self._running else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url} in {self.root}>"


# --------------------------------------------------------------------------- PostgreSQL


def find_postgres_bin() -> Path:
    """The folder holding ``initdb``, ``pg_ctl`` and ``postgres`` of one installation.

    ``initdb`` on ``PATH`` first (resolved, so that a symlink such as
    ``/usr/local/bin/initdb`` leads to its own version's ``pg_ctl``), then
    Debian's ``/usr/lib/postgresql/<version>/bin``, newest version first.
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += [Path(d) for d in sorted(debian, key=lambda d: _version_key(Path(d).parent.name), reverse=True)]
    for folder in candidates:
        if all(os.access(folder / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "postgres")):
            return folder
    raise ServiceError(
        "PostgreSQL's initdb/pg_ctl are not installed (looked on PATH and in /usr/lib/postgresql/*/bin): "
        f"install postgresql (`{SETUP_COMMAND}` does)"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in name.split("."))


class PostgresServer(_Service):
    """A PostgreSQL cluster of its own: trust auth, 127.0.0.1 only, socket in its folder.

    Durability is off (``fsync``, ``synchronous_commit``, ``full_page_writes``):
    the data is thrown away, and ``CREATE DATABASE`` per test stays fast.

    initdb and the server refuse to run as root; as root they run as the
    ``postgres`` user that Debian's package creates (``nobody`` elsewhere),
    which then owns the temp folder.
    """

    superuser = "postgres"

    def __init__(self) -> None:
        self.bin = find_postgres_bin()
        self.port = free_port()
        self._user: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                self._user = pwd.getpwnam("nobody")
        super().__init__("aigw-pg-")
        self.data = self.root / "data"
        self.socket_dir = self.root / "sock"
        self.log_path = self.root / "postgres.log"
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)

    def _temp_parent(self) -> str | None:
        # The unprivileged user must be able to reach the folder.
        default = Path(tempfile.gettempdir())
        return None if self._user is None or _world_traversable(default) else "/tmp"

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        user: dict[str, Any] = {}
        if self._user is not None:
            user = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", HOME=str(self.root))
        return subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=self.root,
            **user,
        )

    def _start(self) -> None:
        r = self._run(
            "initdb",
            "-D", str(self.data),
            "-U", self.superuser,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )  # fmt: skip
        if r.returncode != 0:
            raise ServiceError(f"initdb failed ({r.returncode}):\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
        self.socket_dir.mkdir()
        if self._user is not None:
            os.chown(self.socket_dir, self._user.pw_uid, self._user.pw_gid)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# aigw test server\n"
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = off\n"
                "synchronous_commit = off\n"
                "full_page_writes = off\n"
            )
        r = self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log_path), "-w", "-t", "60", "start", timeout=90)
        if r.returncode != 0:
            raise ServiceError(f"pg_ctl start failed ({r.returncode}):\n{r.stderr[-1000:]}\n{_tail(self.log_path)}")

    def _stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            r = self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop", timeout=60)
            if r.returncode != 0 and (self.data / "postmaster.pid").exists():
                self._kill_postmaster()

    def _kill_postmaster(self) -> None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown; children follow
        except (OSError, ValueError, IndexError):
            pass

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database (``postgresql+psycopg://``)."""
        return f"postgresql+psycopg://{self.superuser}@127.0.0.1:{self.port}/postgres"


# --------------------------------------------------------------------------- RabbitMQ


def _find(name: str, *preferred: str) -> str | None:
    for path in preferred:
        if os.access(path, os.X_OK):
            return path
    return shutil.which(name)


class RabbitMQServer(_Service):
    """A RabbitMQ node of its own, with its own epmd, all on 127.0.0.1.

    Node ``aigw-test-<amqp port>@localhost``; AMQP, distribution and epmd on
    free ports; Mnesia, logs, configuration, enabled-plugins file (empty: no
    management plugin) and the Erlang cookie (``$HOME``) in its folder. The
    system's ``/etc/rabbitmq`` files are not read. ``guest`` may log in, as
    RabbitMQ allows it from loopback.
    """

    def __init__(self) -> None:
        # Debian's /usr/sbin/rabbitmq-server is a wrapper that switches to the
        # rabbitmq user and logs to /var/log/rabbitmq; the real script is this one.
        server = _find("rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server")
        ctl = _find("rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl")
        epmd = _find("epmd", "/usr/bin/epmd")
        if server is None or ctl is None or epmd is None:
            raise ServiceError(
                "rabbitmq-server (with rabbitmqctl and Erlang's epmd) is not installed: "
                f"install rabbitmq-server (`{SETUP_COMMAND}` does)"
            )
        self.server_bin, self.ctl_bin, self.epmd_bin = server, ctl, epmd
        self.port = free_port()
        self.dist_port = free_port()
        self.epmd_port = free_port()
        self.nodename = f"aigw-test-{self.port}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self.epmd: subprocess.Popen[bytes] | None = None
        super().__init__("aigw-rabbitmq-")
        self.log_path = self.root / "rabbitmq.out"

    @property
    def env(self) -> dict[str, str]:
        """The environment for ``rabbitmq-server`` and ``rabbitmqctl`` of this node."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        r = self.root
        env.update(
            HOME=str(r),  # .erlang.cookie
            ERL_EPMD_PORT=str(self.epmd_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(r / "mnesia"),
            RABBITMQ_LOG_BASE=str(r / "log"),
            RABBITMQ_CONFIG_FILE=str(r / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(r / "advanced.config"),  # absent
            RABBITMQ_CONF_ENV_FILE=str(r / "rabbitmq-env.conf"),  # empty: not /etc/rabbitmq's
            RABBITMQ_ENABLED_PLUGINS_FILE=str(r / "enabled_plugins"),  # empty: no management plugin
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
        )
        return env

    def _start(self) -> None:
        r = self.root
        # (AMQP listener: RABBITMQ_NODE_IP_ADDRESS/RABBITMQ_NODE_PORT above.)
        (r / "rabbitmq.conf").write_text("loopback_users.guest = true\n")
        (r / "rabbitmq-env.conf").write_text("")
        (r / "enabled_plugins").write_text("[].\n")
        env = self.env
        # Its own epmd in the foreground (a child we can stop), not `epmd -daemon`.
        self.epmd = subprocess.Popen(
            [self.epmd_bin, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait(lambda: _connects(self.epmd_port), 10, "epmd to listen")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.server_bin],
                env=env,
                cwd=r,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: stop() reaches beam.smp and its helpers
            )
        try:
            _wait(self._ready, 120, f"RabbitMQ node {self.nodename} to accept AMQP on port {self.port}")
        except _Timeout as e:
            raise ServiceError(f"{e}:\n{_tail(self.log_path)}") from None

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise ServiceError(f"rabbitmq-server exited with {self.proc.returncode}:\n{_tail(self.log_path)}")
        return amqp_ready(self.port)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``rabbitmqctl -n <node> ...`` against this node."""
        return subprocess.run(
            [self.ctl_bin, "-n", self.nodename, *args], env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                # SIGTERM to the start script: it stops the node cleanly, as
                # `rabbitmqctl stop` does, in about 1 s instead of 2-2.5 s (no
                # second Erlang VM to boot for the command).
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    pass
            _signal_group(self.proc, signal.SIGKILL)  # whatever is left of its group
            if self.proc.poll() is None:
                self.proc.wait()
            self.proc = None
        if self.epmd is not None:
            _signal_group(self.epmd, signal.SIGKILL)
            self.epmd.wait()
            self.epmd = None

    @property
    def url(self) -> str:
        """AMQP URL as guest on the default vhost."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _connects(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def amqp_ready(port: int, timeout: float = 2) -> bool:
    """Whether an AMQP 0-9-1 broker answers the protocol header with Connection.Start."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            head = b""
            while len(head) < 11:
                chunk = s.recv(11 - len(head))
                if not chunk:
                    return False
                head += chunk
    except OSError:
        return False
    # Method frame (1) on channel 0, class 10 (connection), method 10 (start).
    return head[0] == 1 and head[1:3] == b"\x00\x00" and head[7:11] == b"\x00\x0a\x00\x0a"
