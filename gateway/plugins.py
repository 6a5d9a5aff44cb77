"""Pipeline plugin discovery (entry point group ``aigw.pipelines``).

Built-in pipelines register through the same entry points as third-party
ones. A plugin that cannot be imported, whose factory raises, that does not
implement the contract, is disabled, or whose model is missing or fails its
sha256 check is listed as unavailable with the reason; the service starts
anyway and the other pipelines run.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from gateway.config import Config
from gateway.contract import Pipeline, PipelineUnavailable
from gateway.models import ModelRegistry

__all__ = ["ENTRY_POINT_GROUP", "PluginSet", "discover"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aigw.pipelines"


@dataclass
class PluginSet:
    """Pipelines that can run, and those that cannot with the reason."""

    available: dict[str, Pipeline] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)


def _load_target(spec: str) -> Callable[[], Any]:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]


def _sources(extra: Sequence[str]) -> list[tuple[str, str, Callable[[], Callable[[], Any]]]]:
    out: list[tuple[str, str, Callable[[], Callable[[], Any]]]] = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        out.append((ep.name, f"entry point {ep.value}", ep.load))
    for spec in extra:

        def load(s: str = spec) -> Callable[[], Any]:
            return _load_target(s)

        out.append((spec.rpartition(":")[2] or spec, f"config plugin {spec}", load))
    return out


def discover(config: Config, models: ModelRegistry, verify_models: bool = True) -> PluginSet:
    """Load every plugin; never raises for a broken plugin."""
    result = PluginSet()
    for ep_name, origin, load in _sources(config.plugins):
        try:
            factory = load()
            # A class (the usual factory) also passes the runtime Protocol check,
            # so instantiate classes and call other callables that are not pipelines.
            is_instance = isinstance(factory, Pipeline) and not isinstance(factory, type)
            pipeline = factory if is_instance or not callable(factory) else factory()
        except PipelineUnavailable as exc:
            result.unavailable[ep_name] = str(exc)
            result.origin[ep_name] = origin
            continue
        except ImportError as exc:
            result.unavailable[ep_name] = f"missing dependency: {exc.name or exc}"
            result.origin[ep_name] = origin
            continue
        except Exception as exc:
            log.exception("pipeline plugin %s failed to load", ep_name)
            result.unavailable[ep_name] = f"failed to load: {type(exc).__name__}: {exc}"
            result.origin[ep_name] = origin
            continue
        if not isinstance(pipeline, Pipeline):
            result.unavailable[ep_name] = "does not implement the pipeline contract (name, selects, models, run)"
            result.origin[ep_name] = origin
            continue
        name = str(pipeline.name)
        result.origin[name] = origin
        if name in result.available:
            result.unavailable[f"{name} ({origin})"] = f"duplicate pipeline name {name!r}; first one kept"
            continue
        if not config.pipeline_enabled(name):
            result.unavailable[name] = "disabled in configuration"
            continue
        reason = _check_models(pipeline, models) if verify_models else None
        if reason is not None:
            result.unavailable[name] = reason
            continue
        result.available[name] = pipeline
    for name, why in result.unavailable.items():
        log.warning("pipeline %s unavailable: %s", name, why)
    return result


def _check_models(pipeline: Pipeline, models: ModelRegistry) -> str | None:
    try:
        specs = list(pipeline.models())
    except Exception as exc:
        return f"models() raised {type(exc).__name__}: {exc}"
    for spec in specs:
        reason = models.verify(spec.name)
        if reason is not None:
            return f"model {spec.name}: {reason}"
    return None
