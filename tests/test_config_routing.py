"""Configuration validation, routing semantics, completion hints, UIDs, send status classes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.completion import count_hint, slide_pyramid_complete
from gateway.config import ConfigError, load_config
from gateway.contract import Instance, Selection, SeriesInfo
from gateway.index import SendState
from gateway.routing import Router
from gateway.scu import classify_status
from gateway.uids import InvalidUID, checked_uid, derived_uid
from tests.conftest import REPO, mr_series


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def test_defaults_need_no_file() -> None:
    cfg = load_config(None, environ={})
    assert cfg.gateway.port == 11112 and cfg.metrics.host == "127.0.0.1"
    assert cfg.database_url.startswith("sqlite:///")


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    p = write(tmp_path, "[gateway]\nport = 2000\nae_title = 'FILE'\n")
    cfg = load_config(p, {"gateway.port": 4000}, environ={"AIGW_PORT": "3000", "AIGW_AE_TITLE": "ENV"})
    assert cfg.gateway.port == 4000  # flag beats env beats file
    assert cfg.gateway.ae_title == "ENV"
    cfg = load_config(p, environ={"AIGW_DESTINATIONS": "PACS@10.0.0.1:104,ARCH@h:11112"})
    assert [d.ae_title for d in cfg.destinations] == ["PACS", "ARCH"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[gateway]\nport = 'abc'\n", "gw.toml: gateway.port:"),
        ("[gateway]\nae_title = 'WAY_TOO_LONG_AE_TITLE'\n", "gateway.ae_title: an AE title is 1 to 16"),
        ("[gateway]\nbogus = 1\n", "gateway.bogus: Extra inputs are not permitted"),
        (
            "[[routes]]\nname='r'\npipeline='p'\nconditions=[{keyword='Modality', regex='(['}]\n",
            "routes[0].conditions[0].regex: invalid regular expression",
        ),
        (
            "[[routes]]\nname='r'\npipeline='p'\nconditions=[{keyword='Modality', equals='MR', exists=true}]\n",
            "routes[0].conditions[0]: a condition needs exactly one of",
        ),
        ("[[routes]]\nname='a'\npipeline='p'\n[[routes]]\nname='a'\npipeline='p'\n", "duplicate name"),
        ("not toml [", "gw.toml: not valid TOML"),
    ],
)
def test_errors_name_file_rule_and_field(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text), environ={})
    assert expected in str(exc.value)


def test_env_errors_name_the_variable() -> None:
    with pytest.raises(ConfigError, match="environment AIGW_PORT: gateway.port"):
        load_config(None, environ={"AIGW_PORT": "x"})


class _Dwi:
    name = "dwi"

    def selects(self, series: SeriesInfo) -> Selection:
        n = len(series.values("DiffusionBValue"))
        return Selection(n >= 4, f"{n} distinct b-values (needs >= 4)")

    def models(self) -> list[object]:
        return []

    def run(self, series: object, ctx: object) -> list[object]:
        return []


def _series(headers: list[dict[str, object]], calling_ae: str = "MRI1") -> SeriesInfo:
    insts = [Instance(f"1.{i}", "1.2.840.10008.5.1.4.1.1.4", Path(), h) for i, h in enumerate(headers)]
    return SeriesInfo("1.2", "1.3", str(headers[0].get("Modality", "")), calling_ae, insts)


def test_default_selector_route_and_narrow_widen_replace(tmp_path: Path) -> None:
    dwi = _series([{"Modality": "MR", "DiffusionBValue": b, "MagneticFieldStrength": 1.5} for b in (0, 50, 400, 800)])
    t1 = _series([{"Modality": "MR", "SeriesDescription": "T1 ivim", "MagneticFieldStrength": 0.3}])
    implicit = Router([], {"dwi": _Dwi()})  # type: ignore[dict-item]
    assert implicit.matches(dwi) == [("dwi", "dwi")] and implicit.matches(t1) == []

    cfg = load_config(
        write(
            tmp_path,
            """
[[routes]]
name = "narrow"
pipeline = "dwi"
conditions = [{keyword = "MagneticFieldStrength", range = [1.0, 3.5]}]
[[routes]]
name = "widen"
pipeline = "dwi"
selector = "widen"
conditions = [{keyword = "SeriesDescription", regex = "(?i)ivim"}]
[[routes]]
name = "replace"
pipeline = "dwi"
selector = "replace"
calling_ae = ["MRI1"]
conditions = [{aggregate = "instances", range = [1, 1]}]
""",
        ),
        environ={},
    )
    router = Router(cfg.routes, {"dwi": _Dwi()})  # type: ignore[dict-item]
    assert [r for r, _ in router.matches(dwi)] == ["narrow", "widen"]
    assert [r for r, _ in router.matches(t1)] == ["widen", "replace"]
    assert router.matches(_series([{"Modality": "MR"}], calling_ae="OTHER")) == []
    decision = router.decide(cfg.routes[0], t1)
    assert not decision.matched and any("value 0.3" in r for r in decision.reasons)


def test_unknown_pipeline_in_route_is_a_config_problem(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[[routes]]\nname='x'\npipeline='nope'\n"), environ={})
    problems = Router(cfg.routes, {"dwi": _Dwi()}).check()  # type: ignore[dict-item]
    assert problems and "routes[0].pipeline: unknown pipeline 'nope'" in problems[0]


def test_route_quiet_period_from_first_instance(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "[[routes]]\nname='slow'\npipeline='dwi'\nquiet_period_seconds=60\n"
            "conditions=[{keyword='Modality', equals='SM'}]\n",
        ),
        environ={},
    )
    router = Router(cfg.routes, {"dwi": _Dwi()}, default_quiet_seconds=10)  # type: ignore[dict-item]
    assert router.quiet_seconds({"Modality": "SM"}, "X") == 60
    assert router.quiet_seconds({"Modality": "MR"}, "X") == 10


def test_count_hints_and_slide_pyramid() -> None:
    assert count_hint({"ImagesInAcquisition": 24}, "1.2.840.10008.5.1.4.1.1.4") == 24
    assert count_hint({"NumberOfFrames": 30}, "1.2.840.10008.5.1.4.1.1.4.1") == 1
    assert count_hint({}, "1.2.840.10008.5.1.4.1.1.4") is None
    base = {"ImageType": ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"], "TotalPixelMatrixColumns": 4096,
            "TotalPixelMatrixRows": 4096, "Columns": 256, "Rows": 256}
    mid = {**base, "ImageType": ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"], "TotalPixelMatrixColumns": 1024,
           "TotalPixelMatrixRows": 1024}
    top = {**mid, "TotalPixelMatrixColumns": 256, "TotalPixelMatrixRows": 200}
    assert not slide_pyramid_complete([base, mid])
    assert slide_pyramid_complete([base, mid, top])
    part = {**base, "ConcatenationUID": "1.2.3", "InConcatenationTotalNumber": 2}
    assert not slide_pyramid_complete([part, top])
    assert slide_pyramid_complete([part, part, top])


def test_uids_are_checked_and_derived_deterministically() -> None:
    assert checked_uid("1.2.840.10008.1.2") == "1.2.840.10008.1.2"
    for bad in ("1.2.3/../x", "../../etc", "1..2", "01.2", "1.2." + "3" * 70, "", None, "1.2.3 "[:-1] + "a"):
        with pytest.raises(InvalidUID):
            checked_uid(bad)
    a = derived_uid("1.2.3", 1, "ivim", "instance/0")
    assert a == derived_uid("1.2.3", 1, "ivim", "instance/0") and a != derived_uid("1.2.3", 2, "ivim", "instance/0")
    assert a.startswith("2.25.") and len(a) <= 64


def test_send_status_classes() -> None:
    assert classify_status(0x0000) == SendState.SENT
    assert classify_status(0xB000) == SendState.SENT
    assert classify_status(0xA700) is None  # transient: retry
    assert classify_status(0xA900) == SendState.DEAD
    assert classify_status(0xC211) == SendState.DEAD


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=120)


def test_cli_config_check_and_route_explain(tmp_path: Path, models_dir: Path) -> None:
    cfg = write(
        tmp_path,
        f'plugins = ["tests.plugins.invert:InvertPipeline"]\n[models]\ndir = "{models_dir}"\n'
        '[[routes]]\nname = "t1-only"\npipeline = "test-invert"\n'
        'conditions = [{keyword = "SeriesDescription", regex = "T1"}]\n',
    )
    r = _cli("config", "check", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "configuration OK" in r.stdout and "test-invert" in r.stdout

    t1 = mr_series(tmp_path / "t1", n=2, description="T1 SE", seed=61)
    t2 = mr_series(tmp_path / "t2", n=2, description="T2 FSE", seed=62)
    r = _cli("route", "explain", "--config", str(cfg), str(t1[0].parent), str(t2[0].parent))
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.split("series ")[1:]
    assert len(blocks) == 2
    verdicts = sorted(b.strip().splitlines()[-1].strip() for b in blocks)
    assert verdicts == ["=> test-invert", "=> unrouted (keep)"]
    assert "FAIL SeriesDescription ~ /T1/: value 'T2 FSE'" in r.stdout

    bad = write(tmp_path, "[[routes]]\nname='x'\npipeline='nope'\n")
    r = _cli("config", "check", "--config", str(bad))
    assert r.returncode == 2 and "routes[0].pipeline: unknown pipeline 'nope'" in r.stderr
    assert "Traceback" not in r.stderr


def test_models_verify_refuses_tampered_model_and_plugin_is_unavailable(tmp_path: Path) -> None:
    from tests.plugins.invert.lab.model import build_model

    folder = tmp_path / "models"
    path = build_model(folder)
    cfg = write(tmp_path, f'plugins = ["tests.plugins.invert:InvertPipeline", "no_such_module:thing"]\n'
                          f'[models]\ndir = "{folder}"\n')
    r = _cli("models", "verify", "--config", str(cfg))
    assert r.returncode == 0 and "test-invert: OK" in r.stdout
    path.write_bytes(path.read_bytes() + b"\0")
    r = _cli("models", "verify", "--config", str(cfg))
    assert r.returncode == 1 and "does not match manifest" in r.stdout
    r = _cli("models", "list", "--config", str(cfg))
    assert r.returncode == 0
    assert "pipeline test-invert: UNAVAILABLE: model test-invert" in r.stdout
    assert "pipeline thing: UNAVAILABLE: missing dependency: no_such_module" in r.stdout
    assert "CPUExecutionProvider" in r.stdout


def test_admin_commands_without_an_index_explain_themselves(tmp_path: Path) -> None:
    r = _cli("jobs", "list", "--data-dir", str(tmp_path / "nothing"))
    assert r.returncode == 2 and "no index" in r.stderr and "Traceback" not in r.stderr
    r = _cli("series", "complete", "../../etc/passwd", "--data-dir", str(tmp_path))
    assert r.returncode == 2 and "not a valid UID" in r.stderr


def test_example_config_is_valid() -> None:
    r = _cli("config", "check", "--config", str(REPO / "ops" / "aigw.example.toml"))
    assert r.returncode == 0, r.stderr
