"""The quality report never takes a cost ratio across machines (pipelines/quality/machines.py).

The matrix's pieces run in different sessions on different 2-core machines, one ~1.9x slower than
the other: a variant that ran only on the slow machine, divided by a plain run from the fast one,
would read as ~1.9x the cost. The ledger (`<records>/machines.json`) names which machine wrote which
record, and the report compares seconds only within one machine.
"""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from .conftest import REPO


@pytest.fixture
def quality_modules(monkeypatch):
    """pipelines/quality's modules, imported as run.py does, and dropped again afterwards (their
    top-level names, e.g. `common`, must not leak into other tests)."""
    before = set(sys.modules)
    monkeypatch.syspath_prepend(str(REPO / "pipelines"))
    monkeypatch.syspath_prepend(str(REPO / "pipelines" / "quality"))
    yield importlib.import_module("machines"), importlib.import_module("report")
    for name in set(sys.modules) - before:
        del sys.modules[name]


LEDGER = [
    {"cpu": "not recorded (2 cores)", "wrote": ["teachers/T1", "stores/T1-views20-spatial32", "tune/*", "runs/plain-seed0"]},
    {"cpu": {"cpu_model": "AMD EPYC", "cpu_count": 2},
     "wrote": ["runs/plain-seed1", "runs/plain-seed2", "runs/T1-pooled-seed0", "runs/T1-pooled-seed1"],
     "store_reextracted_seconds": {"stores/T1-views20-spatial32": 245}},
    {"cpu": {"cpu_model": "Other", "cpu_count": 2}, "wrote": ["runs/T1-spatial-seed*", "references/plain-3*"]},
]


def run(record_id: str, per_epoch: list[float]) -> dict:
    return {"record_id": record_id, "seconds": 20 * sum(per_epoch),
            "train_seconds_per_epoch": {str(e): s for e, s in enumerate(per_epoch, start=1)}}


def test_records_map_to_the_machine_that_wrote_them(quality_modules):
    machines, _ = quality_modules
    assert machines.machine_of(LEDGER, "runs/plain-seed0") == "machine 1"
    assert machines.machine_of(LEDGER, "tune/runs/w10-seed0") == "machine 1"  # a pattern
    assert machines.machine_of(LEDGER, "runs/T1-spatial-seed2") == "machine 3"
    assert machines.machine_of(LEDGER, "runs/T2-pooled-seed0") == machines.UNLISTED
    assert machines.describe(LEDGER, "machine 2") == "machine 2 (AMD EPYC, 2 cores)"
    assert machines.reextracted_seconds(LEDGER, "stores/T1-views20-spatial32") == [("machine 2", 245.0)]


def test_cost_ratios_stay_within_one_machine(quality_modules):
    machines, report = quality_modules
    fast, slow = [34.0, 35.0], [62.0, 64.0]
    runs = {"plain": [run("runs/plain-seed0", fast), run("runs/plain-seed1", slow), run("runs/plain-seed2", slow)],
            "T1-pooled": [run("runs/T1-pooled-seed0", [61.0, 63.0]), run("runs/T1-pooled-seed1", [60.0, 62.0])],
            "T1-spatial": [run("runs/T1-spatial-seed0", [70.0, 70.0])]}

    by_machine = machines.seconds_per_epoch_by_machine(LEDGER, runs["plain"])
    assert by_machine == {"machine 1": [34.5], "machine 2": [63.0, 63.0]}
    pooled = machines.relative_cost(LEDGER, runs["plain"], runs["T1-pooled"])
    assert list(pooled) == ["machine 2"]  # machine 1 ran no pooled run: no ratio there
    assert pooled["machine 2"] == pytest.approx((63.0, 61.5, 61.5 / 63.0))
    assert machines.relative_cost(LEDGER, runs["plain"], runs["T1-spatial"]) == {}

    names = {"plain": "plain", "pooled": "T1-pooled", "spatial": "T1-spatial", "online": "T1-online"}
    lines = report.cost_lines(LEDGER, runs, names, {"seconds": 450.0, "record_id": "teachers/T1"},
                              {"seconds": 190.0, "record_id": "stores/T1-views20-spatial32"})
    text = "\n".join(lines)
    assert f"62 s vs 63 s = **{61.5 / 63.0:.2f}x** on machine 2 (AMD EPYC, 2 cores)" in text
    pooled_across = 61.5 / ((34.5 + 63.0 + 63.0) / 3)  # what averaging every plain run would say: 1.15x
    assert f"{pooled_across:.2f}x" not in text
    assert "spatial cached (auto): no plain run on its machine (machine 3)" in text
    assert "450 s, machine 1" in text and "245 s extracted again on machine 2" in text


def test_a_machine_without_plain_seeds_is_compared_with_its_own_reference(quality_modules):
    """`--piece reference` gives a machine that ran no plain seed a base on that machine; where plain
    seeds ran, they stay the base, and no reference crosses to another machine."""
    _, report = quality_modules
    runs = {"plain": [run("runs/plain-seed1", [62.0, 64.0])],
            "T1-pooled": [run("runs/T1-pooled-seed0", [61.0, 63.0])],
            "T1-spatial": [run("runs/T1-spatial-seed0", [70.0, 70.0])]}
    references = [run("references/plain-3a", [49.0, 51.0]),  # machine 3
                  run("references/plain-2a", [10.0, 10.0])]  # unlisted: not machine 2's base
    names = {"plain": "plain", "pooled": "T1-pooled", "spatial": "T1-spatial", "online": "T1-online"}
    text = "\n".join(report.cost_lines(LEDGER, runs, names, {"seconds": 450.0, "record_id": "teachers/T1"}, None,
                                       references))
    assert "spatial cached (auto): 70 s vs 50 s = **1.40x** on machine 3 (Other, 2 cores) (vs its plain reference run)" in text
    assert "no plain run on its machine" not in text
    assert "62 s vs 63 s = **0.98x** on machine 2 (AMD EPYC, 2 cores)." in text  # the plain seeds, not a reference
    assert "6.20x" not in text and "vs 10 s" not in text


def test_a_malformed_ledger_is_refused_by_name(quality_modules, tmp_path):
    machines, _ = quality_modules
    assert machines.load_ledger(tmp_path) == []  # none: the report describes its own machine
    (tmp_path / "machines.json").write_text(json.dumps({"entries": []}))
    with pytest.raises(SystemExit, match=r"machines\.json is not a machine ledger"):
        machines.load_ledger(tmp_path)


def test_a_side_by_side_bench_on_a_teachers_store_is_quoted_under_that_teacher(quality_modules, tmp_path, monkeypatch):
    """bench_train_step.py --use-store writes train_step_quality_<T>*.json; the report quotes it under
    teacher T only (each variant's epoch times in the records were taken hours apart)."""
    _, report = quality_modules
    monkeypatch.setattr(report, "SIDE_BY_SIDE", tmp_path / "train_step.json")
    bench = {"args": {"student": "configs/tiny_student_replay.py", "distill": ["augmentation=auto"]},
             "machine": {"cpu_model": "AMD EPYC", "git": {"commit": "abcdef0123"}},
             "ratios": {"cached/plain": {"of_medians": 1.031, "min": 1.01, "max": 1.05},
                        "online/cached": None, "online/plain": None}}
    (tmp_path / "train_step_quality_T2.json").write_text(json.dumps(bench))
    names = {"plain": "plain", "pooled": "T2-pooled", "spatial": "T2-spatial", "online": "T2-online"}
    runs = {"T2-pooled": [run("runs/T2-pooled-seed0", [61.0, 63.0])]}

    def text(teacher):
        return "\n".join(report.cost_lines(LEDGER, runs, names, {"seconds": 1.0, "record_id": "teachers/T2"}, None,
                                           teacher=teacher))

    assert ("Side by side on T2's store (`train_step_quality_T2.json`: tiny_student_replay.py augmentation=auto, "
            "AMD EPYC, commit abcdef0): cached/plain 1.031 (per repetition 1.010..1.050) per training step.") in text("T2")
    assert "Side by side on" not in text("T3")
