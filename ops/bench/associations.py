"""Association cost: what one association costs the gateway, against storescp and bare pynetdicom.

What it measures
----------------
Some scanners open one association per image, and every sender pays the
association set-up once per transfer. Here ``--count`` associations are made
one after the other against each receiver (the same three as
``ops/bench/ingest.py``: DCMTK ``storescp``, the bare pynetdicom receiver
``_null_scp.py`` and ``aigw serve`` with no configuration), each of them:

* ``echo``: DCMTK ``echoscu``: associate, C-ECHO, release;
* ``store -R``: DCMTK ``storescu -R`` with one 130 KB MR instance: it
  proposes only the instance's own context, as a scanner does;
* ``store all``: ``storescu`` with its default proposal, every storage SOP
  class it knows (about 120 contexts of 3 transfer syntaxes), as a generic
  sender does; the largest A-ASSOCIATE-RQ a receiver sees in practice.

It reports, per receiver and kind, the wall time per association (the
client's process start included, so the same for every receiver) and the
receiver's CPU per association (not for storescp, which forks a child per
association). The gateway's series never complete during the run (a long
quiet period, no release hint), so no pipeline work is counted.

Run it from the repository root::

    .venv/bin/python ops/bench/associations.py
    .venv/bin/python ops/bench/associations.py --count 100 --receivers aigw storescp
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import HOST, BenchError, GatewayPeer, PynetdicomPeer, StorescpPeer, _Peer, dcmtk, dcmtk_env  # noqa: E402
from ingest import make_instances  # noqa: E402

RECEIVERS = ("storescp", "pynetdicom", "aigw")
KINDS = ("echo", "store -R", "store all")


def _peer(name: str, workdir: Path) -> _Peer:
    if name == "storescp":
        return StorescpPeer(workdir)
    if name == "pynetdicom":
        return PynetdicomPeer(workdir)
    config = workdir / "aigw.toml"
    workdir.mkdir(parents=True, exist_ok=True)
    config.write_text("[completion]\nrelease_hint = false\n")  # nothing completes, so no job runs
    return GatewayPeer(workdir, series_timeout=3600, config=config)


def _command(kind: str, peer: _Peer, file: Path) -> list[str]:
    target = ["-aet", "SCANNER", "-aec", peer.called_ae, HOST, str(peer.port)]
    if kind == "echo":
        return [dcmtk("echoscu"), *target]
    return [dcmtk("storescu"), *(["-R"] if kind == "store -R" else []), *target, str(file)]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=60, help="associations per receiver and kind (default 60)")
    ap.add_argument("--receivers", nargs="+", default=list(RECEIVERS), choices=list(RECEIVERS))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aigw-bench-assoc-") as tmp:
        root = Path(tmp)
        # Two instances per association slot: one for "store -R", one for "store all".
        (root / "files").mkdir()
        files = make_instances(root / "files", 2 * args.count, 131, 1, seed=1)
        results = {}
        try:
            for name in args.receivers:
                # A fresh receiver per cell, and new instances for each store
                # association: none may be taken for a duplicate.
                parts = {"echo": files[: args.count], "store -R": files[: args.count], "store all": files[args.count :]}
                results[name] = {
                    kind: measure_one(name, kind, part, root / f"{name}-{kind.replace(' ', '')}")
                    for kind, part in parts.items()
                }
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr)
            return 1
    print(f"{args.count} associations per cell, one after the other, on loopback; ms per association")
    print(f"{'receiver':<12}" + "".join(f"{kind + ' wall':>16}{kind + ' CPU':>16}" for kind in KINDS))
    for name, per_kind in results.items():
        row = f"{name:<12}"
        for kind in KINDS:
            wall, cpu = per_kind[kind]
            row += f"{wall:>16.1f}{'-' if cpu is None else f'{cpu:.1f}':>16}"
        print(row)
    if "aigw" in results and "pynetdicom" in results:
        for kind in KINDS:
            a, p = results["aigw"][kind][1], results["pynetdicom"][kind][1]
            if a is not None and p:
                print(f"aigw CPU / bare pynetdicom CPU, {kind}: {a / p:.2f}x")
    return 0


def measure_one(name: str, kind: str, files: Sequence[Path], workdir: Path) -> tuple[float, float | None]:
    """One receiver, fresh, and one kind of association: (wall ms, receiver CPU ms) per association."""
    peer = _peer(name, workdir)
    peer.start()
    try:
        cpu0 = peer.cpu_seconds()
        t0 = time.perf_counter()
        for i, f in enumerate(files):
            done = subprocess.run(_command(kind, peer, f), capture_output=True, text=True, timeout=60, env=dcmtk_env())
            if done.returncode != 0:
                raise BenchError(f"{name} {kind} association {i + 1}: {done.stderr.strip()[-300:]}")
        wall = (time.perf_counter() - t0) / len(files)
        cpu1 = peer.cpu_seconds()
    finally:
        peer.stop()
    cpu = None if cpu0 is None or cpu1 is None else (cpu1 - cpu0) / len(files) * 1000
    return wall * 1000, cpu


if __name__ == "__main__":
    sys.exit(main())
