"""What the harness needs from the machine: system binaries, free ports, HTTP on loopback."""

from __future__ import annotations

import os
import random
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["SETUP_COMMAND", "find_tool", "free_port", "http_request", "setup_hint", "wait_until"]


SETUP_COMMAND = "ops/setup.sh"


def setup_hint(what: str) -> str:
    return f"{what}; `{SETUP_COMMAND}` (README, Quick start) installs it"


#: Ports this process handed out, never handed out twice.
_HANDED: set[int] = set()
#: Below this, ports are left to well-known and registered services.
_LOWEST = 10000


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago, outside the kernel's ephemeral range.

    ``bind(port 0)`` takes a port from the ephemeral range, from which every
    outgoing connection also takes its local port: between the pick and the
    server's own bind, a client's ``connect`` could take it (seen in CI as
    Orthanc's "port already in use"). Below the range only servers bind.
    """
    lo, _ = _ephemeral_range()
    if lo - _LOWEST >= 1000:
        rng = random.SystemRandom()
        for _ in range(500):
            port = rng.randrange(_LOWEST, lo)
            if port in _HANDED:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            _HANDED.add(port)
            return port
    with socket.socket() as s:  # a machine whose ephemeral range leaves no room below it
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_tool(tool: str, *alternatives: str) -> str:
    """Path of a system binary, never a same-named script in the virtualenv.

    pynetdicom installs console scripts (``storescu`` ...) into the venv that
    shadow DCMTK's; the peers must be the real ones.

    Raises
    ------
    RuntimeError
        When none of the names is on ``PATH``; the message names the setup command.
    """
    search = os.pathsep.join(
        d
        for d in os.environ.get("PATH", "").split(os.pathsep)
        if d and not Path(d).resolve().is_relative_to(Path(sys.prefix).resolve())
    )
    for name in (tool, *alternatives):
        path = shutil.which(name, path=search)
        if path is not None:
            return path
    raise RuntimeError(setup_hint(f"{tool} is not installed"))


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def http_request(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()
    except OSError:
        return 0, b""
