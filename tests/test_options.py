"""Pipeline options: validated against each pipeline's model, delivered to selector and run, documented."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.models import ModelRegistry
from gateway.plugins import discover, options_reference
from tests.conftest import mr_series

REPO = Path(__file__).resolve().parents[1]
PLUGIN = 'plugins = ["tests.plugins.invert:InvertPipeline"]\n'


def _write(folder: Path, text: str, name: str = "aigw.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, env=env, timeout=120
    )


def _discover(tmp_path: Path, text: str, models_dir: Path) -> object:
    cfg = load_config(_write(tmp_path, f'{PLUGIN}[models]\ndir = "{models_dir}"\n{text}'))
    return discover(cfg, ModelRegistry(cfg.models.dir, cfg.models.providers))


def test_options_reach_the_selector_and_the_pipeline(tmp_path: Path, models_dir: Path) -> None:
    plugins = _discover(tmp_path, '[pipelines.test-invert]\nmodalities = ["CT"]\nmax_value = 1000\n', models_dir)
    assert plugins.config_errors == []  # type: ignore[attr-defined]
    pipeline = plugins.available["test-invert"]  # type: ignore[attr-defined]
    assert pipeline.options.modalities == ("CT",) and pipeline.options.max_value == 1000

    # Through the CLI: the option decides routing, where before it was ignored.
    mr = mr_series(tmp_path / "mr", n=1, description="T1", seed=71)
    cfg = _write(tmp_path, f'{PLUGIN}[models]\ndir = "{models_dir}"\n[pipelines.test-invert]\nmodalities = ["CT"]\n')
    r = _cli("route", "explain", "--config", str(cfg), str(mr[0].parent))
    assert r.returncode == 0, r.stderr
    assert "modality 'MR' is not one of CT" in r.stdout and "=> unrouted" in r.stdout


@pytest.mark.parametrize(
    ("table", "needle"),
    [
        ("sleeep_seconds = 1\n", "pipelines.test-invert.sleeep_seconds: unknown option"),
        ("max_value = 0\n", "pipelines.test-invert.max_value: Input should be greater than or equal to 1"),
        ('fail_times = "twice"\n', "pipelines.test-invert.fail_times: Input should be a valid integer"),
    ],
)
def test_bad_options_name_file_key_and_reason(tmp_path: Path, models_dir: Path, table: str, needle: str) -> None:
    plugins = _discover(tmp_path, f"[pipelines.test-invert]\n{table}", models_dir)
    errors = plugins.config_errors  # type: ignore[attr-defined]
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'aigw.toml'}: {needle}")
    assert "test-invert" not in plugins.available  # type: ignore[attr-defined]


def test_config_check_refuses_bad_built_in_options_and_accepts_good_ones(tmp_path: Path) -> None:
    # The case of the issue: a bad value and a misspelt key used to pass with "configuration OK".
    bad = _write(tmp_path, "[pipelines.ivim]\nmin_bvalues = -3\nmin_bvalue = 4\n[pipelines.lf2hf]\ncontrast = 'PD'\n")
    r = _cli("config", "check", "--config", str(bad))
    assert r.returncode == 2, r.stdout
    assert "configuration OK" not in r.stdout and "Traceback" not in r.stderr
    assert f"{bad}: pipelines.ivim.min_bvalues:" in r.stderr
    assert f"{bad}: pipelines.ivim.min_bvalue: unknown option" in r.stderr
    assert f"{bad}: pipelines.lf2hf.contrast:" in r.stderr

    good = _write(tmp_path, "[pipelines.ivim]\nmin_bvalues = 99\n[pipelines.lf2hf]\nmax_field_t = 0.3\n", "good.toml")
    r = _cli("config", "check", "--config", str(good))
    assert r.returncode == 0, r.stderr
    cfg = load_config(good)
    plugins = discover(cfg, ModelRegistry(cfg.models.dir, cfg.models.providers))
    assert plugins.available["ivim"].options.min_bvalues == 99  # type: ignore[attr-defined]
    assert plugins.available["lf2hf"].options.max_field_t == 0.3  # type: ignore[attr-defined]


def test_tables_for_pipelines_that_do_not_exist(tmp_path: Path, models_dir: Path) -> None:
    text = "[pipelines.ivm]\nmethod = 'net'\n[pipelines.not-installed]\nenabled = false\n"
    plugins = _discover(tmp_path, text, models_dir)
    errors = plugins.config_errors  # type: ignore[attr-defined]
    # A misspelt name with options is an error; switching off something absent is harmless.
    assert len(errors) == 1 and errors[0].startswith(f"{tmp_path / 'aigw.toml'}: pipelines.ivm: no such pipeline")


def test_service_refuses_to_start_with_bad_options(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = _write(tmp_path, f'[gateway]\ndata_dir = "{data}"\nport = 0\n[pipelines.ivim]\nmin_bvalues = 0\n')
    r = _cli("serve", "--config", str(cfg))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "pipelines.ivim.min_bvalues" in r.stderr and "Traceback" not in r.stderr


def test_options_reference_is_generated_from_the_models() -> None:
    doc = (REPO / "docs" / "options.md").read_text()
    assert doc == options_reference(), "docs/options.md is stale: run `aigw config options > docs/options.md`"
    for name in ("ivim", "lf2hf", "wsi-mil"):
        assert f"## `[pipelines.{name}]`" in doc
