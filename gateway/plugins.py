"""Pipeline plugin discovery (entry point group ``aigw.pipelines``) and option validation.

Built-in pipelines register through the same entry points as third-party
ones. A plugin that cannot be imported, whose factory raises, that does not
implement the contract, is disabled, or whose model is missing or fails its
sha256 check is listed as unavailable with the reason; the service starts
anyway and the other pipelines run.

Options are different: a ``[pipelines.<name>]`` table with an unknown key, a
bad value, or no pipeline of that name is a configuration error
(:attr:`PluginSet.config_errors`), reported by ``aigw config check`` and
refused at start like any other bad setting, because a silently ignored
option changes what a pipeline does without anyone noticing. The factory's
``options_model`` (a :class:`gateway.contract.PipelineOptions`) validates
the table, and the factory receives the validated object.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from gateway.config import Config
from gateway.contract import Pipeline, PipelineOptions, PipelineUnavailable
from gateway.models import ModelRegistry

__all__ = ["ENTRY_POINT_GROUP", "OptionsError", "PluginSet", "discover", "options_reference"]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "aigw.pipelines"


class OptionsError(ValueError):
    """A ``[pipelines.<name>]`` table the pipeline's options model refuses; one line per problem."""


@dataclass
class PluginSet:
    """Pipelines that can run, and those that cannot with the reason.

    ``config_errors`` lists option problems as ``<file>: pipelines.<name>.<key>:
    <reason>`` lines; the service and workers refuse to start while it is not
    empty, and ``aigw config check`` prints them and fails.
    """

    available: dict[str, Pipeline] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    config_errors: list[str] = field(default_factory=list)


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


def options_model(factory: object) -> type[PipelineOptions] | None:
    """The factory's declared options model, or None for a plugin that takes no options."""
    model = getattr(factory, "options_model", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None  # type: ignore[return-value]


def build_options(factory: object, name: str, raw: Mapping[str, Any], source: str) -> PipelineOptions | None:
    """Validate the raw ``[pipelines.<name>]`` options (``enabled`` removed) for ``factory``.

    Returns the validated options, or None for a factory without an options
    model and no options. Raises :class:`OptionsError` naming the file, the
    key and the reason for every problem.
    """
    model = options_model(factory)
    if model is None:
        if raw:
            raise OptionsError(
                "\n".join(f"{source}: pipelines.{name}.{key}: unknown option (this pipeline takes none)" for key in raw)
            )
        return None
    try:
        return model.model_validate(dict(raw))
    except ValidationError as exc:
        lines = []
        for e in exc.errors():
            key = ".".join(str(p) for p in e["loc"]) or "(table)"
            msg = "unknown option" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: pipelines.{name}.{key}: {msg}")
        raise OptionsError("\n".join(lines)) from None


def _instantiate(factory: Any, name: str, config: Config) -> Any:
    # A pipeline object (not a class) was registered directly: it has no
    # factory to pass options to, so it must take none.
    if (isinstance(factory, Pipeline) and not isinstance(factory, type)) or not callable(factory):
        build_options(None, name, config.pipeline_options(name), config.source)
        return factory
    options = build_options(factory, name, config.pipeline_options(name), config.source)
    return factory() if options is None else factory(options)


def discover(config: Config, models: ModelRegistry, verify_models: bool = True) -> PluginSet:
    """Load every plugin with its validated options; never raises for a broken plugin."""
    result = PluginSet()
    seen: set[str] = set()
    for ep_name, origin, load in _sources(config.plugins):
        name = ep_name
        try:
            factory = load()
            name = str(getattr(factory, "name", ep_name))
            seen.update((ep_name, name))
            if not config.pipeline_enabled(name):
                result.unavailable[name] = "disabled in configuration"
                result.origin[name] = origin
                continue
            pipeline = _instantiate(factory, name, config)
        except OptionsError as exc:
            result.config_errors.extend(str(exc).splitlines())
            result.unavailable[name] = "invalid options in configuration"
            result.origin[name] = origin
            continue
        except PipelineUnavailable as exc:
            result.unavailable[name] = str(exc)
            result.origin[name] = origin
            continue
        except ImportError as exc:
            result.unavailable[name] = f"missing dependency: {exc.name or exc}"
            result.origin[name] = origin
            continue
        except Exception as exc:
            log.exception("pipeline plugin %s failed to load", name)
            result.unavailable[name] = f"failed to load: {type(exc).__name__}: {exc}"
            result.origin[name] = origin
            continue
        if not isinstance(pipeline, Pipeline):
            result.unavailable[name] = "does not implement the pipeline contract (name, selects, models, run)"
            result.origin[name] = origin
            continue
        name = str(pipeline.name)
        seen.add(name)
        result.origin[name] = origin
        if name in result.available:
            result.unavailable[f"{name} ({origin})"] = f"duplicate pipeline name {name!r}; first one kept"
            continue
        reason = _check_models(pipeline, models) if verify_models else None
        if reason is not None:
            result.unavailable[name] = reason
            continue
        result.available[name] = pipeline
    for table, settings in config.pipelines.items():
        # Disabling a pipeline that is not installed is harmless; options for
        # one are a misspelt name or a missing package, both worth stopping for.
        if table not in seen and settings.model_extra:
            known = ", ".join(sorted(seen)) or "none"
            result.config_errors.append(f"{config.source}: pipelines.{table}: no such pipeline (installed: {known})")
    for name, why in result.unavailable.items():
        log.warning("pipeline %s unavailable: %s", name, why)
    for line in result.config_errors:
        log.error("%s", line)
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


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    return text or str(annotation).replace("typing.", "")


def options_reference(extra: Iterable[str] = ()) -> str:
    """The options of every installed pipeline as Markdown, generated from their options models.

    ``docs/options.md`` is this text (a test keeps the two equal), so the
    reference can never drift from what the loader accepts.
    """
    out = [
        "# Pipeline options",
        "",
        "Generated from the pipelines' options models by `aigw config options`; do not edit by hand.",
        "Each pipeline reads its table `[pipelines.<name>]` of the configuration. `enabled = false`",
        "turns a pipeline off. Any other key the table below does not list, or a value outside what",
        "it says, is refused by `aigw config check` and at start, with the file, the key and the reason.",
    ]
    for name, _origin, load in sorted(_sources(list(extra)), key=lambda s: s[0]):
        try:
            factory = load()
        except Exception as exc:  # a reference is still useful without one broken plugin
            out += ["", f"## `[pipelines.{name}]`", "", f"Not loadable here: {type(exc).__name__}."]
            continue
        name = str(getattr(factory, "name", name))
        model = options_model(factory)
        out += ["", f"## `[pipelines.{name}]`", ""]
        if model is None or not model.model_fields:
            out.append("No options besides `enabled`.")
            continue
        out += ["| option | type | default | meaning |", "|---|---|---|---|"]
        for key, info in model.model_fields.items():
            default = "required" if info.is_required() else f"`{info.get_default()!r}`"
            meaning = (info.description or "").replace("|", "\\|").replace("\n", " ")
            kind = _type_name(info.annotation).replace("|", "\\|")
            out.append(f"| `{key}` | `{kind}` | {default} | {meaning} |")
    return "\n".join(out) + "\n"
