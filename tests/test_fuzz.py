"""A bounded fuzz run of the structure walk and the A-ASSOCIATE-RQ checker (tests/fuzz/fuzz_structure.py).

The seeded mutation fuzzer runs for at most :data:`RUNS` inputs or
:data:`SECONDS`, from the seed corpus of :mod:`tests.fuzz.corpus`, with a
fixed seed: a finding reproduces with the same seed, and its bytes are in
the failure message. The longer, coverage-guided run is atheris's (README,
"Fuzzing").
"""

from __future__ import annotations

import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.fuzz.fuzz_structure import ASSOCIATE_RQ, DATASET, fuzz, mutate, one_input, seeds

SEED = 16
RUNS = 30_000
SECONDS = 15.0


@pytest.fixture(scope="module")
def pool() -> list[bytes]:
    return seeds()


def test_the_seed_corpus_has_both_verdicts_for_both_targets(pool: list[bytes]) -> None:
    # A corpus of only refusals (or only passes) would leave half of each target unexplored.
    verdicts: dict[int, set[bool]] = {DATASET: set(), ASSOCIATE_RQ: set()}
    for data in pool:
        verdicts[data[0]].add(one_input(data) == "passed")
    assert verdicts == {DATASET: {True, False}, ASSOCIATE_RQ: {True, False}}


def test_bounded_fuzz_run_finds_no_unexpected_outcome(pool: list[bytes]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pydicom, on the invalid UIDs that mutants carry
        ran, found = fuzz(pool, seed=SEED, max_inputs=RUNS, max_seconds=SECONDS)
    assert found is None, f"seed {SEED}, {found.report()}"
    assert ran >= min(RUNS, 5_000), f"only {ran} inputs in {SECONDS} s"


def test_a_finding_is_reported_with_its_reproducer(pool: list[bytes]) -> None:
    # The harness itself: a target that breaks on a byte pattern is caught, with the bytes to replay.
    def fragile(data: bytes) -> str:
        verdict = one_input(data)
        if b"\xff\xff\xff\xff" in data[1:] and data[0] == DATASET:
            raise KeyError("planted")
        return verdict

    ran, found = fuzz(pool, seed=SEED, max_inputs=RUNS, max_seconds=SECONDS, target=fragile)
    assert found is not None and found.error == "KeyError: 'planted'"
    assert ran == found.index + 1
    assert bytes.fromhex(found.report(1 << 20).split("bytes.fromhex('")[1].split("'")[0]) == found.data
    again = fuzz(pool, seed=SEED, max_inputs=ran, max_seconds=SECONDS, target=fragile)[1]
    assert again == found, "the same seed reproduces the same finding"


def test_mutants_keep_their_target_and_refusals_are_verdicts() -> None:
    rng = random.Random(SEED)
    data = bytes([DATASET]) + bytes(200)
    assert all(mutate(rng, data, [data, b"\x01xyz"])[0] == DATASET for _ in range(100)), "mutants keep their target"
    # The documented refusal is a verdict (its message), not a finding.
    assert "'DICM' prefix is missing" in one_input(bytes([DATASET]) + b"not a part 10 file")


def test_the_atheris_target_runs(pool: list[bytes], tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, data in enumerate(pool):
        (corpus / f"seed-{i:03d}").write_bytes(data)
    done = subprocess.run(
        [sys.executable, str(REPO / "tests/fuzz/fuzz_structure.py"), "-runs=3000", "-seed=16", str(corpus)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,  # where libFuzzer would write a crash-* reproducer
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "Done 3000 runs" in done.stderr
