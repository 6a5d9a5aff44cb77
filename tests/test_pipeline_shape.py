"""Every pipeline has the template's shape, and imports only what the contract allows.

The shape is what lets a newcomer find things: the same five runtime modules
in every pipeline, and ``lab/`` for what never runs in the service. The
import rule is what keeps plugins independent of the gateway's internals.
"""

from __future__ import annotations

import ast
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from gateway.contract import PipelineOptions
from gateway.plugins import ENTRY_POINT_GROUP, options_model

REPO = Path(__file__).resolve().parents[1]
RUNTIME = {"__init__.py", "pipeline.py", "options.py", "preprocess.py", "infer.py", "dicom.py"}
PACKAGES = sorted(p.parent for p in (REPO / "pipelines").glob("*/pipeline.py")) + [REPO / "tests/plugins/invert"]
# The lab's shared helpers make sessions and write manifests the way the service reads them.
LAB_GATEWAY_IMPORTS = {"gateway.models", "gateway.storage"}


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    # Top level only: what loading the module runs (imports inside functions,
    # such as the demo hooks' lab imports, happen only when called).
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_runtime_modules_are_the_five_and_lab_holds_the_rest(package: Path) -> None:
    runtime = {p.name for p in package.glob("*.py")}
    assert runtime == RUNTIME, f"{package.relative_to(REPO)}: {sorted(runtime ^ RUNTIME)} differ from the template"
    assert (package / "lab" / "__init__.py").is_file()
    lab = ".".join(package.relative_to(REPO).parts) + ".lab"
    for name in RUNTIME:
        imported = _imports(package / name, top_level_only=True)
        assert not {m for m in imported if m == lab or m.startswith(lab + ".")}, f"{name} imports the lab at load time"
        assert "torch" not in imported, f"{name} imports torch: the service never needs it"


def test_pipelines_import_only_the_contract_from_the_gateway() -> None:
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        allowed = {"gateway.contract"} | (LAB_GATEWAY_IMPORTS if path.name == "_lab.py" else set())
        used = {m for m in _imports(path) if m == "gateway" or m.startswith("gateway.")}
        assert used <= allowed, f"{path.relative_to(REPO)} imports {sorted(used - allowed)}"


def test_helpers_exist_once() -> None:
    for path in sorted((REPO / "pipelines").rglob("*.py")):
        text = path.read_text()
        rel = path.relative_to(REPO)
        assert "InferenceSession(" not in text, f"{rel}: make sessions with pipelines._lab.cpu_session or ctx.sessions"
        assert "100_000 * 10" not in text, f"{rel}: use gateway.contract.derived_series_number"
        assert "def sha256_file" not in text or rel.as_posix() == "pipelines/_lab.py", rel
        assert "torch.onnx.export(" not in text or rel.as_posix() == "pipelines/_lab.py", rel


def test_every_installed_pipeline_declares_documented_options() -> None:
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        model = options_model(ep.load())
        assert model is not None and issubclass(model, PipelineOptions), ep.name
        for key, info in model.model_fields.items():
            assert info.description, f"{ep.name}: option {key} has no description for docs/options.md"


def _resolves(dotted: str) -> bool:
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as exc:
            if exc.name == "torch":  # a lab module that trains: it exists, CI has no torch
                return True
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def test_model_cards_and_manifests_name_code_that_exists() -> None:
    import re

    files = sorted((REPO / "exported_models").glob("*.json")) + sorted((REPO / "exported_models").glob("*.md"))
    files.append(REPO / "README.md")
    stale = set()
    for path in files:
        for line in path.read_text().splitlines():
            if ".toml: pipelines." in line:  # a configuration key in an example message, not code
                continue
            for dotted in re.findall(r"\bpipelines(?:\.[A-Za-z_][A-Za-z0-9_]*)+", line):
                if not _resolves(dotted):
                    stale.add(f"{path.name}: {dotted}")
    assert not stale, sorted(stale)
