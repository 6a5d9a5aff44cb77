"""Fuzz target: the structure walk and the A-ASSOCIATE-RQ checker take any bytes and return a verdict.

The property, for arbitrary bytes:

* :func:`gateway.structure.read_file_meta` then
  :func:`gateway.structure.check_structure` return, or raise
  :class:`~gateway.structure.MalformedDataSet` (their one documented
  refusal), and never anything else;
* :func:`gateway.frontdoor.check_associate_rq` returns ``None`` or a
  ``(Rejection | Abort, str)`` verdict, and never raises;
* neither takes longer than :data:`MAX_SECONDS` on one input.

The first byte of an input picks the target (even: a Part 10 file, odd: an
A-ASSOCIATE-RQ PDU); the rest is what it gets. Run it longer with atheris
(libFuzzer's flags; the seed corpus of :mod:`tests.fuzz.corpus` is added
unless a corpus folder is given)::

    .venv/bin/python tests/fuzz/fuzz_structure.py -max_total_time=600

or, without atheris, as the seeded mutation fuzzer the suite runs
(:func:`fuzz`)::

    .venv/bin/python tests/fuzz/fuzz_structure.py --plain --seed 16 --runs 1000000
"""

from __future__ import annotations

import argparse
import atexit
import os
import random
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root holds the `gateway` and `tests` packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from gateway.frontdoor import check_associate_rq
from gateway.status import Abort, Rejection
from gateway.structure import MalformedDataSet, check_structure, read_file_meta

#: The longest one input may take; the walk reads headers only, so real files take milliseconds.
MAX_SECONDS = 2.0
#: Bound on a deflated data set's inflated size, as ``[gateway]`` bounds it in the service.
MAX_INFLATED_BYTES = 1 << 24
DATASET, ASSOCIATE_RQ = 0, 1
#: Values that sit on boundaries of PS3.5 7.1 lengths and PS3.8 9.3 lengths.
_INTERESTING = (
    b"\xff\xff\xff\xff",  # undefined length
    b"\xf0\xff\xff\x7f",  # 0x7FFFFFF0, little endian
    b"\x7f\xff\xff\xf0",  # 0x7FFFFFF0, big endian
    b"\x00\x00\x00\x00",
    b"\xfe\xff\x00\xe0",  # item tag (LE)
    b"\xfe\xff\xdd\xe0",  # sequence delimiter (LE)
    b"\xff\xfe\xe0\x00",  # item tag (BE)
    b"SQ\x00\x00",
    b"UN\x00\x00",
    b"\xe0\x7f\x10\x00",  # (7FE0,0010) Pixel Data
    b"\xff\xff",
    b"\x80",
    b"\x01",
)


class UnexpectedOutcome(AssertionError):
    """A target broke the property: an undocumented exception, a wrong result type or too slow."""


class _Scratch:
    """One temporary file that every data-set input is written to (the walk takes a path)."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="aigw-fuzz-", suffix=".dcm")
        os.close(fd)
        self.path = Path(name)
        atexit.register(self.path.unlink, missing_ok=True)

    def write(self, data: bytes) -> Path:
        self.path.write_bytes(data)
        return self.path


_scratch: _Scratch | None = None


def check_dataset(data: bytes) -> str:
    """The structure walk's verdict on ``data`` as a Part 10 file: ``"passed"`` or the refusal's message."""
    global _scratch
    if _scratch is None:
        _scratch = _Scratch()
    path = _scratch.write(data)
    try:
        check_structure(path, read_file_meta(path), max_inflated_bytes=MAX_INFLATED_BYTES)
    except MalformedDataSet as e:
        return str(e)
    return "passed"


def check_request(data: bytes) -> str:
    """The front door's verdict on ``data`` as an A-ASSOCIATE-RQ PDU; raises if it is not one."""
    found = check_associate_rq(data)
    if found is None:
        return "passed"
    verdict, detail = found
    if not isinstance(verdict, Rejection | Abort) or not isinstance(detail, str):
        raise UnexpectedOutcome(f"check_associate_rq returned {found!r}")
    return detail


TARGETS: tuple[Callable[[bytes], str], ...] = (check_dataset, check_request)


def one_input(data: bytes) -> str:
    """Run the target the first byte picks on the rest; raise :class:`UnexpectedOutcome` if it is too slow.

    Any exception other than the target's own refusal escapes: that is the finding.
    """
    if not data:
        return "empty"
    t0 = time.monotonic()
    verdict = TARGETS[data[0] % len(TARGETS)](data[1:])
    seconds = time.monotonic() - t0
    if seconds > MAX_SECONDS:
        raise UnexpectedOutcome(f"took {seconds:.1f} s (at most {MAX_SECONDS} s)")
    return verdict


# ------------------------------------------------------------------ seeds
def seeds() -> list[bytes]:
    """The seed corpus, each input prefixed with its target byte (built by :mod:`tests.fuzz.corpus`)."""
    from tests.fuzz.corpus import associate_requests, malformed_datasets, valid_datasets

    # Deep nesting only to the hundreds: the 20,000-deep seed is half a megabyte per mutation.
    data = {**valid_datasets(), **malformed_datasets(depths=(40, 300))}
    return [bytes([DATASET]) + v for v in data.values()] + [
        bytes([ASSOCIATE_RQ]) + v for v in associate_requests().values()
    ]


# ------------------------------------------------------------------ the plain mutation fuzzer
@dataclass(frozen=True)
class Finding:
    """An input that broke the property, and what happened."""

    index: int
    data: bytes
    error: str

    def report(self, limit: int = 256) -> str:
        """The reproducer, as hex (truncated to ``limit`` bytes), for a test failure message."""
        more = f" ... ({len(self.data)} bytes in all)" if len(self.data) > limit else ""
        return f"input #{self.index}: {self.error}\nreproducer: bytes.fromhex('{self.data[:limit].hex()}'){more}"


def mutate(rng: random.Random, data: bytes, pool: Sequence[bytes]) -> bytes:
    """One to four random edits of ``data``: bit flips, boundary values, inserts, deletes, cuts, splices.

    The target byte (the first) is kept, so a mutant stays with its target.
    """
    head, buf = data[:1], bytearray(data[1:])
    for _ in range(rng.randint(1, 4)):
        n = len(buf)
        op = rng.randrange(7)
        at = rng.randrange(n + 1)
        if op == 0 and n:
            i = rng.randrange(n)
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2:
            value = rng.choice(_INTERESTING)
            buf[at : at + len(value)] = value
        elif op == 3:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 4 and n:
            del buf[at : at + rng.randint(1, 64)]
        elif op == 5:
            del buf[at:]
        else:  # splice: this input's head, another seed's tail (same target or not)
            other = rng.choice(pool)[1:]
            buf[at:] = other[rng.randrange(len(other) + 1) :]
    return head + bytes(buf)


def fuzz(
    pool: Sequence[bytes],
    *,
    seed: int,
    max_inputs: int,
    max_seconds: float,
    target: Callable[[bytes], object] = one_input,
) -> tuple[int, Finding | None]:
    """Run ``target`` on every seed, then on mutants, until ``max_inputs`` or ``max_seconds``.

    Deterministic for a given ``seed`` and pool (only the time bound may cut
    the run short). Returns the number of inputs run and the first finding.
    """
    rng = random.Random(seed)
    deadline = time.monotonic() + max_seconds
    for i in range(max_inputs):
        if time.monotonic() > deadline:
            return i, None
        data = pool[i] if i < len(pool) else mutate(rng, rng.choice(pool), pool)
        try:
            target(data)
        except Exception as e:
            return i + 1, Finding(i, data, f"{type(e).__name__}: {e}")
    return max_inputs, None


# ------------------------------------------------------------------ command line
def _plain(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="seeded mutation fuzzer (no atheris needed)")
    parser.add_argument("--plain", action="store_true")
    parser.add_argument("--seed", type=int, default=16)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--seconds", type=float, default=600)
    args = parser.parse_args(argv)
    ran, found = fuzz(seeds(), seed=args.seed, max_inputs=args.runs, max_seconds=args.seconds)
    print(f"{ran} inputs, seed {args.seed}: " + ("no finding" if found is None else found.report(4096)))
    return 0 if found is None else 1


def _atheris(argv: list[str]) -> None:
    import atheris

    # Coverage feedback for the code under test only: instrumenting pydicom and numpy as well costs a minute.
    import gateway.frontdoor
    import gateway.structure

    for module in (gateway.structure, gateway.frontdoor):
        for value in list(vars(module).values()):
            if callable(value) and getattr(value, "__module__", None) == module.__name__:
                if isinstance(value, type):
                    for name, fn in list(vars(value).items()):
                        if callable(fn) and hasattr(fn, "__code__"):
                            setattr(value, name, atheris.instrument_func(fn))
                elif hasattr(value, "__code__"):
                    setattr(module, value.__name__, atheris.instrument_func(value))
    global check_structure, read_file_meta, check_associate_rq
    check_structure, read_file_meta = gateway.structure.check_structure, gateway.structure.read_file_meta
    check_associate_rq = gateway.frontdoor.check_associate_rq
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus folder given: start from the seeds
        corpus = Path(tempfile.mkdtemp(prefix="aigw-fuzz-corpus-"))
        for i, data in enumerate(seeds()):
            (corpus / f"seed-{i:03d}").write_bytes(data)
        argv = [*argv, str(corpus)]
    atheris.Setup(argv, lambda data: one_input(data) and None)
    atheris.Fuzz()


if __name__ == "__main__":
    # pydicom warns about every invalid UID a mutant carries; the verdict is what counts.
    warnings.simplefilter("ignore", UserWarning)
    if "--plain" in sys.argv:
        sys.exit(_plain(sys.argv[1:]))
    _atheris(sys.argv)
