"""The fuzzer of tests/fuzzing.py: its quick seeded run must find nothing, and its harness must be able to fail
(a crash, a hang, debris, a changed input, a foreign exception and a wrong output are each reported)."""

import json
import os
import subprocess
import sys

import fuzzing

TESTS = os.path.dirname(os.path.abspath(__file__))

# 3,000 cases take ~15 s on 2 cores after ~5 s of worker start-up; `make fuzz` runs 100,000.
QUICK_SEED = 9
QUICK_CASES = 3000


def test_quick_fuzz_run_finds_nothing():
    tally = fuzzing.fuzz(seed=QUICK_SEED, cases=QUICK_CASES, workers=2)
    assert tally.cases == QUICK_CASES
    failures = tally.failure_count  # a plain int: pytest would print the whole tally's repr otherwise
    assert failures == 0, tally.table()
    assert set(tally.by_mutator) == set(fuzzing.MUTATORS), "a mutator never ran"
    # The run must reach every stage: merges that succeed and are compared, files refused, dtypes not merged.
    assert tally.outcomes["merged"] >= 200, tally.table()
    assert tally.outcomes["refused (FormatError)"] >= 1000, tally.table()
    assert tally.outcomes["opened; merge refused (PlanError)"] >= 100, tally.table()


def clean_case(index, **overrides):
    """A case whose merge succeeds: the unmutated mergeable file and its partner."""
    family = fuzzing.corpus()["mergeable"]
    case = {
        "seed": 0,
        "index": index,
        "family": family.name,
        "mutator": "none",
        "data": family.base,
        "partner": family.partner,
        "mutated_first": True,
        "in_directory": False,
        "output": "file",
        "old_output": False,
        "inject": None,
    }
    return {**case, **overrides}


def test_harness_reports_every_misbehaviour():
    """Each injected misbehaviour is a failure of its own kind, and the run goes on after crashes and hangs."""
    expected = {
        "sigbus": "FAIL crash: SIGBUS",
        "hang": "FAIL hang",
        "debris": "FAIL debris",
        "modify_input": "FAIL input changed",
        "foreign": "FAIL merge raised KeyError",
        "corrupt_output": "FAIL output differs from the reference merge",
    }
    cases = []
    for inject in expected:
        cases.append(clean_case(len(cases), inject=inject, mutator=f"inject.{inject}"))
        cases.append(clean_case(len(cases)))  # a healthy case after each: the restarted worker runs it
    results = {case["index"]: (case, result) for case, result in fuzzing.run_cases(cases, workers=2, deadline_s=3)}
    assert len(results) == len(cases)
    for case, result in results.values():
        want = expected.get(case["inject"], "merged")
        assert result["label"] == want, (case["inject"], result)

    tally = fuzzing.Tally()
    for case, result in results.values():
        tally.add(case, result)
    assert tally.failure_count == len(expected) and tally.outcomes["merged"] == len(expected)
    assert {f["mutator"] for f in tally.failures} == {f"inject.{k}" for k in expected}
    assert "0:0" in tally.table()  # the replay handle of a failure is printed


def test_outcomes_against_safetensors(tmp_path):
    """The oracle's verdicts on files whose fate is known: a duplicate tensor name, which safetensors loads
    (the last one wins) and pysoup refuses, is informational; an unmutated pair merges into a directory that
    held an older output."""
    family = fuzzing.corpus()["small"]
    _, text, data = fuzzing.split_file(family.base)
    items = list(json.loads(text).items())
    items.append(items[0])  # the same tensor twice: safetensors' file still covers its data exactly
    bad = clean_case(0, data=fuzzing.serialise(fuzzing.Pairs(tuple(items)), data), partner=family.partner)
    result = fuzzing.check_case(bad, str(tmp_path))
    assert result["label"] == "info: refuses what safetensors loads (FormatError)", result
    assert "duplicate key" in result["info"]
    good = fuzzing.check_case(clean_case(1, output="shards", old_output=True), str(tmp_path))
    assert good["label"] == "merged", good
    assert os.listdir(tmp_path) == []


def test_cases_are_a_function_of_seed_and_index():
    script = f"import sys; sys.path.insert(0, {TESTS!r}); import fuzzing; print(fuzzing.cases_digest(5, 300))"
    other_process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == fuzzing.cases_digest(5, 300)
    assert fuzzing.make_case(5, 7) != fuzzing.make_case(6, 7)


def test_replay_prints_the_header_and_the_outcome():
    handle = "3:11"
    proc = subprocess.run(
        [sys.executable, fuzzing.FUZZER_PATH, "--replay", handle], capture_output=True, text=True, timeout=300
    )
    case = fuzzing.make_case(3, 11)
    assert f"mutator {case['mutator']}" in proc.stdout
    assert "header length field" in proc.stdout and "outcome: " in proc.stdout
    assert proc.returncode == (1 if "outcome: FAIL" in proc.stdout else 0), proc.stdout + proc.stderr
