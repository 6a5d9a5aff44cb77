"""Connection and association caps that hold for all listener processes together.

With several listener processes on one port (:mod:`gateway.listeners`) the
kernel hashes each new connection to one of them (``SO_REUSEPORT``), so the
connections of a site are never spread evenly. An equal share of each cap per
process would refuse senders long before the site's cap is reached: with 16
processes and ``max_associations = 16``, the second association that happens
to land on a busy process would be turned away. So every process publishes
what it holds in one table in shared memory, and a new connection or
association is checked against the sum over all of them.

* Each process writes only its own row, from its front door's selector
  thread. A check and the increment that follows it run under an ``flock``,
  so two processes never both take the last slot; the kernel drops the lock
  of a process that dies holding it.
* A row holds the process's connections, associations and, per source
  address, its connections. The address is kept as a 64-bit hash, never as
  text; a row needs at most ``max_connections`` address entries, since each
  one is held by at least one connection.
* The row of a process that died is cleared by its supervisor before the
  process is started again (its connections died with it).

One process uses the same code with a private table and no lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gateway.config import GatewaySettings

__all__ = ["Caps", "SlotTable", "Slots"]

# Column of a row: connections, associations, then the address keys and their counts.
_CONNECTIONS, _ASSOCIATIONS, _FIXED = 0, 1, 2


@dataclass(frozen=True)
class Caps:
    """The site-wide caps (``[gateway]`` settings of the same names)."""

    max_connections: int
    max_per_address: int
    max_associations: int

    @classmethod
    def from_settings(cls, s: GatewaySettings) -> Caps:
        return cls(s.max_connections, s.max_connections_per_address, s.max_associations)


def _key(address: str) -> int:
    """A non-zero 64-bit key for an address (0 marks a free entry)."""
    key = int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little", signed=True)
    return key or 1


class _FileLock(AbstractContextManager[None]):
    """An exclusive ``flock`` on one file, opened lazily in the process that takes it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        assert self._fd is not None
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_fd": None}  # a descriptor does not cross into a spawned process


class SlotTable:
    """What every listener process holds: one row per process.

    Parameters
    ----------
    caps : Caps
        The caps to keep, for all rows together.
    processes : int
        Rows: the listener processes, the gateway's own included (row 0).
    lock_path : Path, optional
        The file whose ``flock`` orders the processes' checks; needed when
        ``processes > 1``, then the table lives in shared memory and may be
        passed to a process started with multiprocessing's ``spawn``.
    """

    def __init__(self, caps: Caps, processes: int = 1, lock_path: Path | None = None) -> None:
        if processes > 1 and lock_path is None:
            raise ValueError("a table shared by several processes needs a lock file")
        self.caps = caps
        self.processes = processes
        self._width = _FIXED + 2 * caps.max_connections
        size = processes * self._width
        # Shared memory for several processes; plain memory for one.
        self._raw: Any = (
            multiprocessing.get_context("spawn").RawArray("q", size) if processes > 1 else bytearray(8 * size)
        )
        self._lock: AbstractContextManager[Any] = _FileLock(lock_path) if lock_path is not None else nullcontext()
        self._view()

    def _view(self) -> None:
        self._rows = np.frombuffer(self._raw, dtype=np.int64).reshape(self.processes, self._width)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_rows"]  # a view; rebuilt on the shared memory in the other process
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._view()

    def row(self, number: int) -> Slots:
        """The slots of listener process ``number`` (0: the gateway process)."""
        if not 0 <= number < self.processes:
            raise IndexError(f"no listener process {number} in a table of {self.processes}")
        return Slots(self, number)

    def clear(self, number: int) -> None:
        """Forget what process ``number`` held: it died, and its connections with it."""
        with self._lock:
            self._rows[number, :] = 0

    def totals(self) -> tuple[int, int]:
        """Connections and associations held now by all processes together."""
        return int(self._rows[:, _CONNECTIONS].sum()), int(self._rows[:, _ASSOCIATIONS].sum())


class Slots:
    """One listener process's view of the shared caps; used only by its front door's selector thread."""

    def __init__(self, table: SlotTable, number: int) -> None:
        self._table = table
        self._row = table._rows[number]
        self._n = table.caps.max_connections
        self._keys = self._row[_FIXED : _FIXED + self._n]
        self._counts = self._row[_FIXED + self._n :]
        self.caps = table.caps

    def open(self, address: str) -> str | None:
        """Take a connection slot for ``address``; the cap it would break (its setting's name) if none."""
        t, caps, key = self._table, self.caps, _key(address)
        with t._lock:
            rows = t._rows
            if int(rows[:, _CONNECTIONS].sum()) >= caps.max_connections:
                return "max_connections"
            keys = rows[:, _FIXED : _FIXED + self._n]
            counts = rows[:, _FIXED + self._n :]
            if int(counts[keys == key].sum()) >= caps.max_per_address:
                return "max_connections_per_address"
            mine = np.flatnonzero(self._keys == key)
            if mine.size:
                i = int(mine[0])
            else:
                # A free entry exists: this row holds fewer than max_connections connections.
                i = int(np.flatnonzero(self._counts == 0)[0])
                self._keys[i] = key
            self._counts[i] += 1
            self._row[_CONNECTIONS] += 1
        return None

    def close(self, address: str) -> None:
        """Give back a connection slot taken by :meth:`open`."""
        mine = np.flatnonzero(self._keys == _key(address))
        if mine.size:
            i = int(mine[0])
            self._counts[i] -= 1
            if self._counts[i] <= 0:
                self._counts[i] = 0
                self._keys[i] = 0
        self._row[_CONNECTIONS] = max(0, int(self._row[_CONNECTIONS]) - 1)

    def associate(self) -> bool:
        """Take an association slot; False if ``max_associations`` are held already."""
        t = self._table
        with t._lock:
            if int(t._rows[:, _ASSOCIATIONS].sum()) >= self.caps.max_associations:
                return False
            self._row[_ASSOCIATIONS] += 1
        return True

    def dissociate(self) -> None:
        """Give back an association slot taken by :meth:`associate`."""
        self._row[_ASSOCIATIONS] = max(0, int(self._row[_ASSOCIATIONS]) - 1)

    def held(self) -> tuple[int, int]:
        """This process's connections and associations."""
        return int(self._row[_CONNECTIONS]), int(self._row[_ASSOCIATIONS])
