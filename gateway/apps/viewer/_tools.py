"""What the harness needs from the machine: system binaries, free ports, HTTP on loopback."""

from __future__ import annotations

import os
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
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
