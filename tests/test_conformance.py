"""The DICOM Conformance Statement (docs/conformance.md) against what the code really does.

Every table between ``<!-- table: NAME -->`` and ``<!-- end -->`` in the
statement is read back and compared, as a set of UIDs or codes, with the
code itself, never with a copy of it:

* SOP classes and transfer syntaxes accepted: a real association on
  loopback with the gateway's own :class:`~gateway.scp.StorageSCP` proposes
  every SOP class and every transfer syntax pydicom knows, and the AE that
  ``StorageSCP.start`` builds is inspected for its supported contexts;
* result SOP classes: the pipelines' DICOM writers (``pipelines/_*.py`` and
  ``pipelines/*/dicom.py``) are inspected for the IODs they build;
* what is proposed when sending: the real :class:`~gateway.scu.Sender`
  sends one file per result SOP class to a recording SCP;
* statuses and rejections: :mod:`gateway.status` and
  :func:`gateway.scu.classify_status`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom.uid
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID, UID_dictionary
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

import gateway.scp
from gateway.config import Config, Destination, GatewaySettings
from gateway.index import Index, SendState
from gateway.jobs import _finalise
from gateway.metrics import Metrics
from gateway.scp import StorageSCP
from gateway.scu import Sender, classify_status
from gateway.status import RejectReason, StorageStatus
from gateway.storage import DataDir
from gateway.uids import derived_uid
from tests.conftest import REPO

DOC = REPO / "docs" / "conformance.md"
_TABLE_RE = re.compile(r"<!-- table: ([a-z0-9-]+) -->\n(.*?)<!-- end -->", re.S)
_CODE_RE = re.compile(r"0x([0-9A-Fa-f]{4})(?:\s*-\s*0x([0-9A-Fa-f]{4}))?")
_MAX_CONTEXTS = 120  # presentation contexts per association (PS3.8 9.3.2.2 allows 128)


# --------------------------------------------------------------------------- the document
def _cells(line: str) -> list[str]:
    return [c.strip().replace("`", "").strip() for c in line.strip().strip("|").split("|")]


def doc_tables() -> dict[str, list[dict[str, str]]]:
    """Every marked table of the statement: name -> rows as {column header: cell text}."""
    tables: dict[str, list[dict[str, str]]] = {}
    for name, body in _TABLE_RE.findall(DOC.read_text(encoding="utf-8")):
        lines = [line for line in body.splitlines() if line.strip().startswith("|")]
        assert len(lines) >= 3, f"table {name!r} in {DOC.name} has no rows"
        header = _cells(lines[0])
        rows = [dict(zip(header, _cells(line))) for line in lines[2:]]
        for row in rows:
            assert len(row) == len(header), f"table {name!r}: row {row} does not match the header {header}"
        assert name not in tables, f"table {name!r} appears twice in {DOC.name}"
        tables[name] = rows
    return tables


def doc_table(name: str) -> list[dict[str, str]]:
    tables = doc_tables()
    assert name in tables, f"{DOC.name} has no table marked <!-- table: {name} --> ... <!-- end -->"
    return tables[name]


def doc_uids(name: str) -> set[str]:
    """The UID column of a marked table (no duplicates allowed)."""
    uids = [row["UID"] for row in doc_table(name)]
    dup = sorted({u for u in uids if uids.count(u) > 1})
    assert not dup, f"table {name!r} lists {dup} more than once"
    return set(uids)


UID_TABLES = (
    "scp-storage-sop-classes",
    "scp-other-sop-classes",
    "scp-storage-transfer-syntaxes",
    "scp-verification-transfer-syntaxes",
    "scu-sop-classes",
    "scu-transfer-syntaxes",
)


def _codes(cell: str) -> list[int]:
    """Status codes of a cell: ``0xA700`` or a range ``0xA700-0xA7FF`` (both ends and the middle)."""
    out: list[int] = []
    for lo, hi in _CODE_RE.findall(cell):
        a = int(lo, 16)
        out.extend([a] if not hi else [a, (a + int(hi, 16)) // 2, int(hi, 16)])
    return out


def _first_int(cell: str) -> int:
    return int(cell.split()[0], 0)


# ------------------------------------------------------------------------------ the gateway
@dataclass
class RunningSCP:
    scp: StorageSCP
    ae: AE  # the AE that StorageSCP.start built
    port: int


@pytest.fixture(scope="module")
def gateway_scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSCP]:
    """The gateway's Storage SCP on a free loopback port, with the AE it builds recorded."""
    root = tmp_path_factory.mktemp("conformance-scp")
    index = Index(f"sqlite:///{root / 'index.sqlite'}")
    scp = StorageSCP(
        GatewaySettings(host="127.0.0.1", port=0, data_dir=root),
        DataDir(root),
        index,
        Metrics(),
        quiet_seconds=lambda headers, calling_ae: 10.0,
        release_quiet_seconds=None,
        hint_quiet_seconds=1.0,
        reprocess_late=True,
    )
    built: list[AE] = []

    def recording_ae(*args: Any, **kwargs: Any) -> AE:
        ae = AE(*args, **kwargs)
        built.append(ae)
        return ae

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gateway.scp, "AE", recording_ae)
        port = scp.start()
    try:
        assert len(built) == 1, "StorageSCP.start is expected to build one AE"
        yield RunningSCP(scp, built[0], port)
    finally:
        scp.stop()
        index.close()


def negotiate(port: int, contexts: Sequence[tuple[str, Sequence[str]]]) -> list[tuple[str, str]]:
    """Propose ``contexts`` (abstract syntax, transfer syntaxes) to the gateway; the accepted pairs."""
    assert len(contexts) <= _MAX_CONTEXTS
    ae = AE(ae_title="CONFORMANCE")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    assoc = ae.associate("127.0.0.1", port, ae_title="AIGW")
    try:
        assert assoc.is_established, "the gateway did not accept the association"
        return [(str(cx.abstract_syntax), str(cx.transfer_syntax[0])) for cx in assoc.accepted_contexts]
    finally:
        if assoc.is_established:
            assoc.release()


def _batches(items: Sequence[Any], size: int = _MAX_CONTEXTS) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _known(kind: str) -> set[str]:
    return {uid for uid, entry in UID_dictionary.items() if entry[1] == kind}


# ------------------------------------------------------------------------------ the writers
class _Unresolved(Exception):
    """An expression in a writer that does not name a module-level object."""


def _namespace(module: Any, tree: ast.Module) -> dict[str, Any]:
    """Module globals plus whatever the module imports inside its functions."""
    ns = dict(vars(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            source = importlib.import_module(node.module)
            for alias in node.names:
                if hasattr(source, alias.name):
                    ns.setdefault(alias.asname or alias.name, getattr(source, alias.name))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                ns.setdefault(alias.asname or alias.name.split(".")[0], importlib.import_module(alias.name))
    return ns


def _resolve(node: ast.expr, ns: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in ns:
            raise _Unresolved(node.id)
        return ns[node.id]
    if isinstance(node, ast.Attribute):
        try:
            return getattr(_resolve(node.value, ns), node.attr)
        except AttributeError:
            raise _Unresolved(ast.unparse(node)) from None
    raise _Unresolved(ast.unparse(node))


def _default_transfer_syntax(cls: type) -> str:
    """The transfer_syntax_uid default of a highdicom IOD (it may sit on a base class behind **kwargs)."""
    for klass in cls.__mro__:
        param = inspect.signature(klass.__init__).parameters.get("transfer_syntax_uid")  # type: ignore[misc]
        if param is not None and param.default is not inspect.Parameter.empty:
            return str(param.default)
    raise AssertionError(f"{cls.__name__} has no default transfer syntax")


def _highdicom_sop_class(cls: type, call: ast.Call, ns: dict[str, Any]) -> str:
    keyword = f"{cls.__name__}Storage"
    if issubclass(cls, hd.seg.Segmentation):  # highdicom picks the SOP class from the segmentation type
        for k in call.keywords:
            value = _resolve(k.value, ns) if k.arg == "segmentation_type" else None
            if str(getattr(value, "value", value)) == "LABELMAP":
                keyword = "LabelMapSegmentationStorage"
    uid = getattr(pydicom.uid, keyword, None)
    assert uid is not None, f"cannot tell the SOP class of highdicom's {cls.__name__}: teach this test"
    return str(uid)


def _writes_dicom(tree: ast.Module) -> bool:
    """Whether a module imports highdicom or assigns a SOP Class UID (others, like trainers, are skipped)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "highdicom" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "highdicom":
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Attribute) and t.attr == "SOPClassUID" for t in node.targets
        ):
            return True
    return False


def writer_modules() -> list[Path]:
    """The DICOM writers: the pipelines' shared helpers (``pipelines/_*.py``), each ``dicom.py``, and the gateway's."""
    root = REPO / "pipelines"
    paths = sorted([*root.glob("_*.py"), *root.glob("*/dicom.py"), REPO / "gateway" / "supersede.py"])
    return [p for p in paths if _writes_dicom(ast.parse(p.read_text(encoding="utf-8"), str(p)))]


def result_sop_classes() -> dict[str, set[str]]:
    """SOP class UID -> transfer syntaxes, for every IOD a built-in pipeline's writers build.

    Two kinds of writer are recognised: a call of a highdicom IOD class
    (``hd.pm.ParametricMap(...)``), and an assignment ``ds.SOPClassUID = X``
    in a module that builds the data set itself. An assignment whose value
    is not a module-level name or literal fails the test, so that nothing is
    missed silently.
    """
    found: dict[str, set[str]] = {}
    for path in writer_modules():
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        ns = _namespace(importlib.import_module(name), tree)
        assigned: list[str] = []
        syntaxes: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                try:
                    func = _resolve(node.func, ns)
                except _Unresolved:
                    continue  # a method of a local object, not an IOD class
                if inspect.isclass(func) and issubclass(func, hd.SOPClass):
                    ts = [k.value for k in node.keywords if k.arg == "transfer_syntax_uid"]
                    syntax = str(_resolve(ts[0], ns)) if ts else _default_transfer_syntax(func)
                    found.setdefault(_highdicom_sop_class(func, node, ns), set()).add(syntax)
            elif isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Attribute) and target.attr in ("SOPClassUID", "TransferSyntaxUID"):
                        try:
                            value = str(_resolve(node.value, ns))
                        except _Unresolved as exc:
                            raise AssertionError(
                                f"{path.relative_to(REPO)}:{node.lineno}: {target.attr} = {exc}: not a module-level "
                                "name or literal, so this test cannot tell which SOP class is written"
                            ) from None
                        if target.attr == "SOPClassUID":
                            assigned.append(value)
                        else:
                            syntaxes.add(value)
        if assigned and not syntaxes:
            # The job runner writes the file meta of data sets that have none.
            probe = Dataset()
            probe.SOPClassUID = UID(assigned[0])
            probe.SOPInstanceUID = UID("1.2.3")
            _finalise(probe)
            syntaxes.add(str(probe.file_meta.TransferSyntaxUID))
        for uid in assigned:
            found.setdefault(uid, set()).update(syntaxes)
    return found


# ------------------------------------------------------------------------------ the tables
@pytest.mark.parametrize("table", UID_TABLES)
def test_table_names_are_pydicom_uid_names(table: str) -> None:
    for row in doc_table(table):
        uid = UID(row["UID"])
        assert uid.is_valid, f"{table}: {row['UID']!r} is not a valid UID"
        name = next(iter(row.values()))  # the first column names the UID
        assert name == uid.name, f"{table}: {uid} is {uid.name!r} in pydicom, the statement says {name!r}"


def test_scp_accepts_exactly_the_documented_sop_classes(gateway_scp: RunningSCP) -> None:
    documented = doc_uids("scp-storage-sop-classes") | doc_uids("scp-other-sop-classes")
    candidates = sorted(_known("SOP Class") | _known("Meta SOP Class") | documented)
    accepted: set[str] = set()
    for batch in _batches(candidates):
        accepted |= {
            a for a, _ in negotiate(gateway_scp.port, [(uid, [pydicom.uid.ImplicitVRLittleEndian]) for uid in batch])
        }
    assert accepted - documented == set(), "accepted but not in the statement: add them to its tables"
    assert documented - accepted == set(), "in the statement but not accepted: remove them from its tables"


def test_scp_accepts_exactly_the_documented_transfer_syntaxes(gateway_scp: RunningSCP) -> None:
    storage_ts = doc_uids("scp-storage-transfer-syntaxes")
    verification_ts = doc_uids("scp-verification-transfer-syntaxes")
    candidates = sorted(_known("Transfer Syntax") | storage_ts | verification_ts)
    storage = [row["UID"] for row in doc_table("scp-storage-sop-classes")]
    for abstract, documented in [
        (storage[0], storage_ts),
        (pydicom.uid.MRImageStorage, storage_ts),
        (storage[-1], storage_ts),
        (Verification, verification_ts),
    ]:
        accepted = {ts for _, ts in negotiate(gateway_scp.port, [(abstract, [ts]) for ts in candidates])}
        assert accepted == documented, (
            f"{UID(abstract).name}: accepted but undocumented {sorted(accepted - documented)}, "
            f"documented but refused {sorted(documented - accepted)}"
        )


def test_every_supported_context_matches_the_tables(gateway_scp: RunningSCP) -> None:
    """The AE StorageSCP builds: each storage SOP class with the same, documented transfer syntaxes."""
    contexts = {
        str(cx.abstract_syntax): {str(ts) for ts in cx.transfer_syntax} for cx in gateway_scp.ae.supported_contexts
    }
    storage = doc_uids("scp-storage-sop-classes")
    other = doc_uids("scp-other-sop-classes")
    assert set(contexts) == storage | other
    storage_ts = doc_uids("scp-storage-transfer-syntaxes")
    differ = {UID(a).name: sorted(contexts[a] ^ storage_ts) for a in storage if contexts[a] != storage_ts}
    assert not differ, f"storage SOP classes whose transfer syntaxes differ from the statement: {differ}"
    assert contexts[Verification] == doc_uids("scp-verification-transfer-syntaxes")


def test_scp_accepts_the_first_transfer_syntax_the_sender_proposes(gateway_scp: RunningSCP) -> None:
    documented = doc_uids("scp-storage-transfer-syntaxes")
    j2k, explicit, implicit = (
        pydicom.uid.JPEG2000Lossless,
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
    )
    assert {j2k, explicit, implicit} <= documented
    accepted = dict(
        negotiate(
            gateway_scp.port,
            [(pydicom.uid.MRImageStorage, [j2k, explicit, implicit]), (pydicom.uid.CTImageStorage, [implicit, j2k])],
        )
    )
    assert accepted == {pydicom.uid.MRImageStorage: j2k, pydicom.uid.CTImageStorage: implicit}
    # Two contexts for one SOP class: the preference is the order of first appearance (section 4.1).
    both = negotiate(
        gateway_scp.port, [(pydicom.uid.MRImageStorage, [explicit, j2k]), (pydicom.uid.MRImageStorage, [j2k, explicit])]
    )
    assert [ts for _, ts in both] == [explicit, explicit]


def test_an_association_decodes_its_request_once_and_copies_no_context(
    gateway_scp: RunningSCP, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The front door's decoding of the A-ASSOCIATE-RQ is pynetdicom's, and the supported contexts are shared.

    Decoding it twice and deep-copying 170 contexts of 45 transfer syntaxes
    per association made a C-ECHO association cost 68 ms of CPU
    (``ops/bench/associations.py``); negotiation must come out the same.
    """
    from pynetdicom.pdu import A_ASSOCIATE_RQ
    from pynetdicom.presentation import PresentationContext

    decoded: list[int] = []
    copied: list[int] = []
    decode = A_ASSOCIATE_RQ.decode

    def counting_decode(self: A_ASSOCIATE_RQ, bytestream: bytes) -> None:
        decoded.append(1)
        decode(self, bytestream)

    def counting_copy(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
        if len(self.transfer_syntax) > 2:  # one of the gateway's (the client copies its own two)
            copied.append(1)
        new = PresentationContext()
        new.__dict__.update(self.__dict__)
        return new

    monkeypatch.setattr(A_ASSOCIATE_RQ, "decode", counting_decode)
    monkeypatch.setattr(PresentationContext, "__deepcopy__", counting_copy, raising=False)
    explicit, implicit = pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian
    proposed = [(pydicom.uid.MRImageStorage, [explicit, implicit]), (pydicom.uid.CTImageStorage, [implicit])]
    assert dict(negotiate(gateway_scp.port, proposed)) == {
        pydicom.uid.MRImageStorage: explicit,
        pydicom.uid.CTImageStorage: implicit,
    }
    assert len(decoded) == 1, f"the request was decoded {len(decoded)} times"
    assert not copied, f"{len(copied)} presentation contexts were deep-copied for one association"


def test_rejections_table_matches_the_association_policy() -> None:
    rows = doc_table("scp-rejections")
    documented = {
        (_first_int(r["Result"]), _first_int(r["Source"]), _first_int(r["Reason"]), r["Metric label"]) for r in rows
    }
    code = {(r.result, r.source, r.diagnostic, r.label) for r in RejectReason.ALL}
    assert documented == code, f"only in the statement {documented - code}; only in the code {code - documented}"


def test_storage_statuses_table_matches_gateway_status() -> None:
    rows = doc_table("scp-statuses")
    documented = {(_codes(r["Status"])[0], r["Constant"]) for r in rows}
    code = {(int(s), s.name) for s in StorageStatus}
    assert documented == code, f"only in the statement {documented - code}; only in the code {code - documented}"
    # What the SCP can answer: every StorageStatus member that gateway/scp.py names.
    tree = ast.parse((REPO / "gateway" / "scp.py").read_text(encoding="utf-8"))
    used = {
        n.attr
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "StorageStatus"
    }
    said_never = {r["Constant"] for r in rows if r["Returned when"].lower().startswith("never")}
    assert {s.name for s in StorageStatus} - said_never == used, "the 'Returned when' column is out of date"


_OUTCOMES: dict[str, SendState | None] = {"sent": SendState.SENT, "dead-letter": SendState.DEAD, "retried": None}


def test_scu_statuses_table_matches_classify_status() -> None:
    rows = doc_table("scu-statuses")
    checked = 0
    for row in rows:
        outcome = row["Outcome"].split()[0]
        assert outcome in _OUTCOMES, f"scu-statuses: outcome {row['Outcome']!r} is not one of {sorted(_OUTCOMES)}"
        for code in _codes(row["Status"]):
            assert classify_status(code) == _OUTCOMES[outcome], f"0x{code:04X}: statement says {outcome}"
            checked += 1
    assert checked >= 10


def test_every_result_sop_class_is_documented() -> None:
    produced = set(result_sop_classes())
    assert {pydicom.uid.ParametricMapStorage, pydicom.uid.SegmentationStorage} <= produced, "writer inspection broke"
    documented = doc_uids("scu-sop-classes")
    assert produced - documented == set(), "pipelines write these SOP classes: add them to scu-sop-classes"
    assert documented - produced == set(), "no pipeline writes these SOP classes: remove them from scu-sop-classes"


def test_sender_proposes_the_documented_transfer_syntaxes(tmp_path: Path) -> None:
    """The real Sender, one file per result SOP class and one forwarded JPEG original, to a recording SCP."""
    results = result_sop_classes()
    forwarded = (str(pydicom.uid.VLWholeSlideMicroscopyImageStorage), str(pydicom.uid.JPEGBaseline8Bit))
    files: list[tuple[str, str, Path]] = []
    for n, (sop_class, syntax) in enumerate(
        [*((c, ts) for c, tss in sorted(results.items()) for ts in sorted(tss)), forwarded]
    ):
        ds = Dataset()
        ds.SOPClassUID = UID(sop_class)
        ds.SOPInstanceUID = UID(derived_uid("conformance", n))
        ds.StudyInstanceUID = UID(derived_uid("study"))
        ds.SeriesInstanceUID = UID(derived_uid("series", n))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        _finalise(ds)
        path = tmp_path / f"{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append((str(ds.SOPInstanceUID), sop_class, path))

    proposed: list[tuple[str, list[str]]] = []

    def on_requested(event: evt.Event) -> None:
        for cx in event.assoc.requestor.requested_contexts:
            proposed.append((str(cx.abstract_syntax), [str(ts) for ts in cx.transfer_syntax]))

    pacs = AE(ae_title="RECORDER")
    for sop_class in {c for _, c, _ in files}:
        pacs.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    server = pacs.start_server(
        ("127.0.0.1", 0),
        block=False,
        evt_handlers=[(evt.EVT_REQUESTED, on_requested), (evt.EVT_C_STORE, lambda event: 0x0000)],
    )
    assert server is not None
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        port = int(server.server_address[1])
        config = Config(
            gateway=GatewaySettings(data_dir=tmp_path),
            destinations=[Destination(name="pacs", ae_title="RECORDER", host="127.0.0.1", port=port)],
        )
        index.queue_forward(files, ["pacs"], now=time.time())
        Sender(config, index, Metrics()).run_once()
    finally:
        server.shutdown()
        index.close()

    by_class: dict[str, set[str]] = {}
    for abstract, syntaxes in proposed:
        by_class.setdefault(abstract, set()).update(syntaxes)
    assert set(results) <= set(by_class), "the sender did not propose every result SOP class"
    documented = doc_uids("scu-transfer-syntaxes")
    proposed_for_results = set().union(*(by_class[c] for c in results))
    assert proposed_for_results == documented, (
        f"proposed but undocumented {sorted(proposed_for_results - documented)}, "
        f"documented but not proposed {sorted(documented - proposed_for_results)}"
    )
    # A forwarded original: its own transfer syntax, plus the ones proposed for results.
    assert by_class[forwarded[0]] == documented | {forwarded[1]}
    # ... its own first, so a receiver taking the first syntax it supports is never
    # offered an uncompressed syntax for a compressed file (section 4.2).
    first = {abstract: syntaxes[0] for abstract, syntaxes in proposed}
    assert first[forwarded[0]] == forwarded[1]
