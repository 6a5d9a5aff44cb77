"""Event-driven pynetdicom associations: threads that sleep until there is work.

pynetdicom 3.0 runs two loops per association that poll: the DUL thread
checks its socket with ``select(timeout=0)`` and sleeps 1 ms when nothing
came, and the association's reactor sleeps 1 ms and looks for a decoded
DIMSE message. That is 2,000 wake-ups a second per association whether data
flows or not; measured with py-spy (``ops/bench/profile_ingest.py``) it was a
third of the listener's CPU per instance.

Here each association gets a :class:`Wakeup`: the queues between the two
threads signal it when something is put in them, the DUL thread blocks in
``select`` on its socket *and* a wake-up socket, and the reactor blocks on an
event. Each still wakes every :data:`TICK` seconds without work, because both
loops also check timers (ARTIM, idle) and kill flags. What changes is only
how long the threads sleep; every state transition stays pynetdicom's own.
The pieces replaced are pynetdicom attributes, not its code: ``to_provider_queue``,
``to_user_queue`` and ``dimse.msg_queue`` (same class, a ``put`` that also
wakes), and ``_reactor_checkpoint`` (an ``Event`` whose ``wait`` first waits
for work). ``tests/test_listener_hardening.py`` measures the idle CPU, and
every storescu test runs through it.
"""

from __future__ import annotations

import queue
import select
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.association import Association

__all__ = ["TICK", "Wakeup", "event_driven"]

#: Longest sleep without work: bounds how late a timer expiry or a kill is seen.
TICK = 0.02


class _WakingQueue(queue.Queue[Any]):
    """A queue whose ``put`` also wakes the thread that consumes it."""

    def __init__(self, old: queue.Queue[Any], wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake
        while True:  # whatever was queued before the swap
            try:
                super().put(old.get_nowait())
            except queue.Empty:
                break

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _ReactorGate(threading.Event):
    """The reactor's checkpoint: ``wait`` sleeps until there is work, then honours the pause as before."""

    def __init__(self, work: threading.Event, pending: Callable[[], bool]) -> None:
        super().__init__()
        self.set()  # pynetdicom's checkpoint starts set: the reactor runs
        self._work = work
        self._pending = pending

    def wait(self, timeout: float | None = None) -> bool:
        if not self._pending():
            self._work.wait(TICK)
        # A put after this clear sets it again; one before it left its item in a
        # queue, which the reactor reads next, and _pending() sees on the next wait.
        self._work.clear()
        # Last, so that a pause that began while we slept still holds the reactor.
        return super().wait(timeout)


class Wakeup:
    """The wake-up channel of one association: a socket pair for the DUL, an event for the reactor."""

    def __init__(self) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self.reactor = threading.Event()

    def wake_dul(self) -> None:
        try:
            self._w.send(b"\0")
        except (BlockingIOError, OSError):  # already pending, or closing: either way it wakes
            pass

    def wait_readable(self, sock: socket.socket) -> bool:
        """Block until ``sock`` has data (True) or a wake-up or :data:`TICK` passes (False)."""
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes that select cannot see
        readable, _, _ = select.select([sock, self._r], [], [], TICK)
        if self._r in readable:
            try:
                while self._r.recv(4096):
                    pass
            except (BlockingIOError, OSError):
                pass
        return sock in readable

    def close(self) -> None:
        self._r.close()
        self._w.close()


def event_driven(assoc: Association) -> Wakeup:
    """Make ``assoc``'s two threads sleep until there is work; call before the association starts."""
    wakeup = Wakeup()
    dul, dimse = assoc.dul, assoc.dimse
    dul.to_provider_queue = _WakingQueue(dul.to_provider_queue, wakeup.wake_dul)
    dul.to_user_queue = _WakingQueue(dul.to_user_queue, wakeup.reactor.set)
    dimse.msg_queue = _WakingQueue(dimse.msg_queue, wakeup.reactor.set)

    def pending() -> bool:
        return not (dimse.msg_queue.empty() and dul.to_user_queue.empty())

    assoc._reactor_checkpoint = _ReactorGate(wakeup.reactor, pending)
    # The DUL's sleep after an empty turn: its select now waits for work instead,
    # so the 1 ms sleep would only add latency before each reply goes out.
    dul._run_loop_delay = 0.0
    return wakeup
