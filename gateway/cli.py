"""The ``aigw`` command line.

Commands that inspect or change state (jobs, deadletter, series) work on the
index database directly, so they also work while the service runs (the
service polls the index and picks the changes up).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.config import Config, ConfigError, load_config, parse_destination

__all__ = ["main"]

log = logging.getLogger(__name__)


class Progress:
    """Progress on stderr: a live line on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, what: str) -> None:
        self.total = max(total, 1)
        self.what = what
        self.tty = sys.stderr.isatty()
        self._last = 0.0

    def update(self, done: int, note: str = "") -> None:
        now = time.time()
        final = done >= self.total
        if not final and now - self._last < (0.1 if self.tty else 5.0):
            return
        self._last = now
        line = f"{self.what}: {done}/{self.total} ({100 * done // self.total}%) {note}"
        if self.tty:
            sys.stderr.write("\r" + line[:120].ljust(120) + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (default: embedded defaults)")
    p.add_argument("--data-dir", metavar="DIR", help="data directory (default ./aigw-data)")


def _load(args: argparse.Namespace, extra: dict[str, Any] | None = None) -> Config:
    overrides: dict[str, Any] = {"gateway.data_dir": getattr(args, "data_dir", None)}
    overrides.update(extra or {})
    return load_config(args.config, overrides)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="aigw", description="DICOM AI gateway")
    ap.add_argument("--version", action="version", version=f"aigw {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the gateway service")
    _add_config(p)
    p.add_argument("--host", help="DICOM listen address")
    p.add_argument("--port", type=int, help="DICOM listen port")
    p.add_argument("--ae-title", help="our AE title")
    p.add_argument(
        "--destination", action="append", default=[], metavar="AE@HOST:PORT", help="result destination (repeatable)"
    )
    p.add_argument(
        "--allow-ae", action="append", default=[], metavar="AE", help="accept only these calling AE titles (repeatable)"
    )
    p.add_argument("--metrics-port", type=int, help="Prometheus port (0: any free port)")
    p.add_argument("--series-timeout", type=float, metavar="SECONDS", help="default quiet period of a series")

    p = sub.add_parser("worker", help="run jobs for a gateway with [jobs] executor = 'celery' (scale-out)")
    _add_config(p)
    p.add_argument(
        "--device",
        action="append",
        choices=["cpu", "gpu"],
        help="device class whose queue to consume (repeatable; default cpu)",
    )
    p.add_argument("--concurrency", type=int, metavar="N", help="jobs at once (default: [jobs] workers)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics here (0: any free port)")

    p = sub.add_parser("demo", help="run the end-to-end demo and write report.html")
    p.add_argument("--out", default="aigw-demo", metavar="DIR", help="demo folder (default ./aigw-demo)")
    p.add_argument("--report", default="report.html", metavar="FILE", help="report path (default ./report.html)")
    p.add_argument("--timeout", type=float, default=170.0, help="seconds to wait for results")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file for plugins, models and routes")
    p.add_argument(
        "--no-viewer",
        action="store_true",
        help="use a built-in receiving node instead of Orthanc + OHIF, and take no viewer screenshots",
    )
    p.add_argument(
        "--keep-open",
        action="store_true",
        help="after the report, print the OHIF address and keep the gateway, Orthanc and OHIF up until Ctrl-C",
    )

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("check", help="validate and print the effective configuration")
    _add_config(c)
    c = csub.add_parser("options", help="print the reference of every installed pipeline's options (Markdown)")
    _add_config(c)

    p = sub.add_parser("route", help="routing tools")
    rsub = p.add_subparsers(dest="action", required=True)
    r = rsub.add_parser("explain", help="show which series would go to which pipeline, and why")
    _add_config(r)
    r.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders")
    r.add_argument("--calling-ae", default="", help="pretend the series came from this AE title")

    p = sub.add_parser("jobs", help="pipeline jobs")
    jsub = p.add_subparsers(dest="action", required=True)
    j = jsub.add_parser("list", help="list recent jobs")
    _add_config(j)
    from gateway.index.schema import JobState  # the index's states, so a new one is never missing here

    j.add_argument("--state", choices=[s.value for s in JobState])
    j.add_argument("--limit", type=int, default=50)
    j.add_argument("--json", action="store_true")
    j = jsub.add_parser("retry", help="queue a job again")
    _add_config(j)
    j.add_argument("id", type=int)

    p = sub.add_parser("deadletter", help="sends that failed for good")
    dsub = p.add_subparsers(dest="action", required=True)
    d = dsub.add_parser("list", help="list the dead-letter list")
    _add_config(d)
    d.add_argument("--json", action="store_true")
    d = dsub.add_parser("retry", help="send again")
    _add_config(d)
    g = d.add_mutually_exclusive_group(required=True)
    g.add_argument("id", type=int, nargs="?")
    g.add_argument("--all", action="store_true")

    p = sub.add_parser("series", help="series tools")
    ssub = p.add_subparsers(dest="action", required=True)
    s = ssub.add_parser("complete", help="force completion of a series now")
    _add_config(s)
    s.add_argument("series_uid")

    p = sub.add_parser("dicomweb", help="DICOMweb (STOW-RS) receiver tools")
    wsub = p.add_subparsers(dest="action", required=True)
    wsub.add_parser(
        "hash-token", help="print the sha256 of a bearer token read from stdin, for [[dicomweb.tokens]] sha256"
    )

    p = sub.add_parser("models", help="exported models")
    msub = p.add_subparsers(dest="action", required=True)
    for name, helptext in (
        ("list", "list models, pipelines and the execution providers"),
        ("verify", "check every model file against its sha256"),
    ):
        m = msub.add_parser(name, help=helptext)
        _add_config(m)
    return ap


def _index(cfg: Config) -> Any:
    from gateway.index import Index

    if not cfg.gateway.database_url and not (cfg.gateway.data_dir / "index.sqlite").exists():
        raise ConfigError(
            f"no index at {cfg.gateway.data_dir / 'index.sqlite'}: has the gateway run with this data dir?"
        )
    return Index(cfg.database_url)


def _ts(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import _logging
    from gateway.service import Gateway

    overrides = {
        "gateway.host": args.host,
        "gateway.port": args.port,
        "gateway.ae_title": args.ae_title,
        "gateway.allow_ae": args.allow_ae,
        "metrics.port": args.metrics_port,
        "completion.series_timeout_seconds": args.series_timeout,
        "destinations": [parse_destination(d) for d in args.destination],
    }
    cfg = _load(args, overrides)
    _logging.configure(cfg.logging.level, cfg.logging.format, cfg.logging.third_party_level)
    Gateway(cfg).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from gateway import _logging

    cfg = _load(args)
    if cfg.jobs.executor != "celery":
        raise ConfigError(
            f"{args.config or '<defaults>'}: jobs.executor: `aigw worker` needs executor = 'celery'"
            f" (got '{cfg.jobs.executor}')"
        )
    if args.concurrency is not None and args.concurrency < 1:
        raise ConfigError(f"--concurrency {args.concurrency}: at least 1")
    _logging.configure(cfg.logging.level, cfg.logging.format, cfg.logging.third_party_level)
    from gateway.distributed import run_worker

    return run_worker(cfg, args.device or ["cpu"], args.concurrency, args.metrics_port)


def cmd_config_check(args: argparse.Namespace) -> int:
    from gateway.models import ModelRegistry
    from gateway.plugins import discover
    from gateway.routing import Router

    cfg = _load(args)
    models = ModelRegistry(cfg.models.dir, cfg.models.providers)
    plugins = discover(cfg, models)
    router = Router(cfg.routes, plugins.available, plugins.unavailable)
    problems = plugins.config_errors + router.check()
    print(f"# effective configuration ({args.config or 'embedded defaults'})")
    print(json.dumps(json.loads(cfg.model_dump_json()), indent=2))
    print(f"# pipelines available: {', '.join(sorted(plugins.available)) or 'none'}")
    for name, why in sorted(plugins.unavailable.items()):
        print(f"# pipeline unavailable: {name}: {why}")
    if router.implicit:
        print("# no [[routes]]: each available pipeline uses its default selector")
    if problems:
        for p in problems:
            # Option errors already name their file; routing problems do not.
            print(p if p.startswith(f"{cfg.source}: ") else f"{cfg.source}: {p}", file=sys.stderr)
        return 2
    print("configuration OK")
    return 0


def cmd_config_options(args: argparse.Namespace) -> int:
    from gateway.plugins import options_reference

    print(options_reference(_load(args).plugins), end="")
    return 0


def _iter_files(paths: Iterable[str]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p}: no such file or folder")
    return out


def cmd_route_explain(args: argparse.Namespace) -> int:
    from pydicom import dcmread

    from gateway.contract import Instance, SeriesInfo
    from gateway.headers import routing_headers
    from gateway.models import ModelRegistry
    from gateway.plugins import discover
    from gateway.routing import Router

    cfg = _load(args)
    models = ModelRegistry(cfg.models.dir, cfg.models.providers)
    plugins = discover(cfg, models)
    router = Router(cfg.routes, plugins.available, plugins.unavailable)
    files = _iter_files(args.paths)
    groups: dict[str, list[Instance]] = defaultdict(list)
    skipped = 0
    prog = Progress(len(files), "reading headers")
    for i, f in enumerate(files, 1):
        try:
            ds = dcmread(f, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            groups[uid].append(Instance(str(ds.SOPInstanceUID), str(ds.SOPClassUID), f, routing_headers(ds)))
        except Exception:
            skipped += 1
        prog.update(i)
    if skipped:
        print(f"{skipped} file(s) skipped: not DICOM or missing UIDs", file=sys.stderr)
    if not groups:
        print("no DICOM series found", file=sys.stderr)
        return 1
    for uid, insts in groups.items():
        info = SeriesInfo(uid, "", str(insts[0].headers.get("Modality", "")), args.calling_ae, insts)
        decisions = router.evaluate(info)
        print(f"series {uid}  ({info.modality or '?'}, {info.instance_count} instances)")
        for d in decisions:
            print(f"  route {d.route} -> {d.pipeline}: {'MATCH' if d.matched else 'no match'}")
            for r in d.reasons:
                print(f"      {r}")
        targets = [d.pipeline for d in decisions if d.matched]
        print(f"  => {', '.join(targets) if targets else 'unrouted (' + cfg.completion.unrouted.value + ')'}")
    return 0


def cmd_jobs_list(args: argparse.Namespace) -> int:
    idx = _index(_load(args))
    rows = idx.list_jobs(args.state, args.limit)
    if args.json:
        print(json.dumps([{k: v for k, v in asdict(r).items() if k != "owner"} for r in rows], indent=1))
        return 0
    _table(
        [
            (r.id, r.pipeline, r.route, r.state, r.attempts, r.outputs, _ts(r.created_at), (r.error or "")[:60])
            for r in rows
        ],
        ["ID", "PIPELINE", "ROUTE", "STATE", "TRIES", "OUTPUTS", "CREATED", "ERROR"],
    )
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    idx = _index(_load(args))
    if idx.get_job(args.id) is None:
        print(f"job {args.id}: no such job", file=sys.stderr)
        return 1
    if not idx.retry_job(args.id, now=time.time()):
        print(f"job {args.id} is running; not requeued", file=sys.stderr)
        return 1
    print(f"job {args.id} queued")
    return 0


def cmd_deadletter_list(args: argparse.Namespace) -> int:
    idx = _index(_load(args))
    rows = idx.list_dead()
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    _table(
        [
            (
                r.id,
                r.job_id,
                r.destination,
                r.attempts,
                f"0x{r.last_status:04X}" if r.last_status is not None else "-",
                _ts(r.next_attempt_at),
                (r.error or "")[:70],
            )
            for r in rows
        ],
        ["ID", "JOB", "DESTINATION", "TRIES", "STATUS", "LAST", "REASON"],
    )
    if not rows:
        print("dead-letter list is empty")
    return 0


def cmd_deadletter_retry(args: argparse.Namespace) -> int:
    idx = _index(_load(args))
    n = idx.retry_dead(None if args.all else args.id, now=time.time())
    if not n and not args.all:
        print(f"send {args.id} is not in the dead-letter list", file=sys.stderr)
        return 1
    print(f"{n} send(s) queued again")
    return 0


def cmd_series_complete(args: argparse.Namespace) -> int:
    from gateway.uids import InvalidUID, checked_uid

    try:
        uid = checked_uid(args.series_uid, "SERIES_UID")
    except InvalidUID as exc:
        print(str(exc), file=sys.stderr)
        return 2
    idx = _index(_load(args))
    if not idx.force_complete(uid, now=time.time()):
        print("no such series in the index", file=sys.stderr)
        return 1
    print("series marked complete; the service routes it within a second")
    return 0


def _node_providers(reg: Any) -> tuple[list[str], str]:
    """The providers this node would give sessions (none loaded), and the PROVIDER column's text.

    An onnxruntime that is missing, broken or reports odd provider names must
    not stop the listing: the column then says why it is unknown.
    """
    from gateway.models import provider_label

    try:
        providers = [str(p) for p in reg.providers]
    except Exception as exc:
        return [], f"unknown ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"[:80]
    if not providers:
        return [], "unknown (no execution provider)"
    return providers, provider_label(providers[0])


def cmd_models(args: argparse.Namespace) -> int:
    from gateway.models import ModelRegistry
    from gateway.plugins import discover

    cfg = _load(args)
    reg = ModelRegistry(cfg.models.dir, cfg.models.providers)
    manifests = reg.manifests()
    if args.action == "list":
        providers, provider = _node_providers(reg)
        plugins = discover(cfg, reg)
        batch: dict[str, str] = {}
        for p in plugins.available.values():
            try:
                batch.update((s.name, str(s.batch_size)) for s in p.models())
            except Exception:  # discover() has vetted models() already; a flaky plugin only loses the column
                pass
        batch.update((name, f"{n} (config)") for name, n in cfg.models.batch_sizes.items())
        print(f"models dir: {reg.root}")
        print(
            f"execution providers: {', '.join(providers) or provider}"
            " (sessions run on the first: TensorRT or CUDA where a CUDA device is present, else CPU)"
        )
        _table(
            [(m.name, m.version, m.file, m.sha256[:16], provider, batch.get(m.name, "-")) for m in manifests.values()],
            ["MODEL", "VERSION", "FILE", "SHA256", "PROVIDER", "BATCH"],
        )
        for name, err in reg.errors().items():
            print(f"invalid: {name}: {err}")
        for name, p in sorted(plugins.available.items()):
            print(f"pipeline {name}: available (models: {', '.join(s.name for s in p.models()) or 'none'})")
        for name, why in sorted(plugins.unavailable.items()):
            print(f"pipeline {name}: UNAVAILABLE: {why}")
        return 0
    bad = 0
    prog = Progress(len(manifests), "verifying")
    for i, name in enumerate(manifests, 1):
        reason = reg.verify(name)
        prog.update(i, name)
        print(f"{name}: {'OK' if reason is None else 'FAILED: ' + reason}")
        bad += reason is not None
    for name, err in reg.errors().items():
        print(f"{name}: FAILED: {err}")
        bad += 1
    if not manifests and not reg.errors():
        print(f"no model manifests in {reg.root}")
    return 1 if bad else 0


def cmd_dicomweb_hash_token(args: argparse.Namespace) -> int:
    from gateway.dicomweb import hash_token

    # From stdin, never argv: a token on the command line ends up in shell history and ps.
    token = sys.stdin.readline().strip()
    if not token:
        print("error: no token on stdin (e.g. `openssl rand -hex 32 | tee token | aigw dicomweb hash-token`)",
              file=sys.stderr)
        return 2
    print(hash_token(token))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.apps.demo import run_demo

    config = Path(args.config) if args.config else None
    return run_demo(
        Path(args.out),
        Path(args.report),
        timeout=args.timeout,
        config_path=config,
        viewer=not args.no_viewer,
        keep_open=args.keep_open,
    )


_COMMANDS = {
    ("serve", None): cmd_serve,
    ("demo", None): cmd_demo,
    ("worker", None): cmd_worker,
    ("config", "check"): cmd_config_check,
    ("config", "options"): cmd_config_options,
    ("route", "explain"): cmd_route_explain,
    ("jobs", "list"): cmd_jobs_list,
    ("jobs", "retry"): cmd_jobs_retry,
    ("deadletter", "list"): cmd_deadletter_list,
    ("deadletter", "retry"): cmd_deadletter_retry,
    ("series", "complete"): cmd_series_complete,
    ("dicomweb", "hash-token"): cmd_dicomweb_hash_token,
    ("models", "list"): cmd_models,
    ("models", "verify"): cmd_models,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    handler = _COMMANDS[(args.command, getattr(args, "action", None))]
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"configuration error:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    except Exception as exc:
        from gateway.index import IndexUnavailable  # here: importing the index costs every command's start

        if isinstance(exc, IndexUnavailable):
            print(f"error: {exc}", file=sys.stderr)
            return 1
        raise
