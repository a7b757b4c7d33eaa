"""The quality matrix resumes on a fresh clone from its committed records (pipelines/quality).

Sessions lose their work dirs and stores; what is committed is `docs/quality/records`. A teacher
piece run once, then its work dir thrown away, must still count as done, hand the very same
weights to the next step, and rebuild the store it needs from them without rewriting the record.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO

RUN = REPO / "pipelines" / "quality" / "run.py"


def recipe(tmp_path, *args: str, records=None, data=None) -> subprocess.CompletedProcess:
    """The quick recipe with its work dir and report under tmp_path (records and data there too, unless given)."""
    cmd = [sys.executable, str(RUN), "--quick", "--out", str(tmp_path / "out"),
           "--records", str(records or tmp_path / "records"), "--report-dir", str(tmp_path / "report"),
           "--data", str(data or tmp_path / "data"), *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)


def quality(tmp_path, *args: str) -> subprocess.CompletedProcess:
    proc = recipe(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def plan_status(tmp_path, *args: str) -> dict[str, str]:
    """--plan's status per teacher-T1 step ('train ...' / 'extract ...'): its fixed-width column."""
    out = quality(tmp_path, "--plan", *args).stdout
    return {line.split()[1]: line[72:84].strip() for line in out.splitlines() if line.startswith("teacher-T1 ")}


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    quality(tmp, "--piece", "teacher-T1")
    return tmp


def test_a_finished_teacher_piece_leaves_records_and_safe_weights(recorded):
    from bevcache.teacher import load_checkpoint_file

    records = recorded / "records"
    teacher = json.loads((records / "teachers" / "T1.json").read_text())
    store = json.loads((records / "stores" / "T1-views1-spatial32.json").read_text())
    assert teacher["history"] and teacher["git"]["code_commit"]
    assert store["views"] == 1 and store["seconds"] > 0
    weights = load_checkpoint_file(records / "teachers" / "T1.pth")  # weights-only: nothing that runs code
    assert set(weights) == {"state_dict", "meta"} and weights["meta"]["signature"] == teacher["signature"]


def snapshot(path) -> dict[str, np.ndarray]:
    """Every kind of content of a 1-view store: pooled rows and views, maps, view digests."""
    from bevcache.store import open_store

    store = open_store(str(path))
    rows = np.arange(store.num_samples)
    return {"pooled": store.read_table("pts_neck").numpy(), "pooled views": store.read_table("pts_neck", views=True).numpy(),
            "maps": store.read_spatial("pts_neck", rows), "view maps": store.read_spatial("pts_neck", rows, np.ones_like(rows)),
            "digests": store.read_digests()}


def test_a_fresh_clone_resumes_from_the_records_and_rebuilds_the_store(recorded):
    store = recorded / "out" / "stores" / "T1-views1-spatial32.zarr"
    before = snapshot(store)
    record = recorded / "records" / "stores" / "T1-views1-spatial32.json"
    recorded_text = record.read_text()
    shutil.rmtree(recorded / "out")  # what a new session has: the records only

    assert plan_status(recorded) == {"train": "done", "extract": "done"}
    proc = quality(recorded, "--piece", "teacher-T1")
    assert "teacher" in proc.stdout and "done before, reused" in proc.stdout
    assert "is not here: extracting it again" in proc.stdout
    assert not (recorded / "out" / "teachers" / "T1").exists(), "the recorded teacher was trained again"
    after = snapshot(store)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert record.read_text() == recorded_text, "the first extraction's record was rewritten"


def test_a_cue_lidar_trace_is_another_experiment_and_needs_its_own_data(recorded, tmp_path):
    """`--cue-lidar-trace T` enters every step's signature, so the camera-only records are not taken
    for it (nor touched), and a data root made without that trace is refused before anything runs."""
    assert plan_status(recorded) == {"train": "done", "extract": "done"}
    assert plan_status(recorded, "--cue-lidar-trace", "0.1") == {"train": "todo", "extract": "todo"}
    records_before = sorted(p.relative_to(recorded) for p in (recorded / "records").rglob("*"))

    proc = recipe(tmp_path, "--cue-lidar-trace", "0.1", "--piece", "teacher-T1",
                  records=recorded / "records", data=recorded / "data")
    assert proc.returncode != 0
    assert "cue LiDAR trace 0" in proc.stderr and "--cue-lidar-trace 0.1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "teachers").exists(), "a teacher trained on the wrong data"
    assert sorted(p.relative_to(recorded) for p in (recorded / "records").rglob("*")) == records_before


@pytest.mark.parametrize("weights", ["missing", "another schedule's"])
def test_a_record_without_its_weights_is_refused(recorded, tmp_path, weights):
    """A teacher retrained under other settings must not leave the earlier weights to its store."""
    from mmengine.runner import save_checkpoint

    from bevcache.teacher import load_checkpoint_file

    shutil.copytree(recorded / "records", tmp_path / "records")
    published = tmp_path / "records" / "teachers" / "T1.pth"
    if weights == "missing":
        published.unlink()
    else:
        ckpt = load_checkpoint_file(published)
        save_checkpoint({**ckpt, "meta": {**ckpt["meta"], "signature": "0123456789abcdef"}}, str(published))
    proc = recipe(tmp_path, "--piece", "teacher-T1", data=recorded / "data")
    assert proc.returncode != 0
    assert "weights" in proc.stderr and "T1.pth" in proc.stderr and "Traceback" not in proc.stderr


def test_a_plain_reference_records_this_machines_seconds_per_epoch(recorded):
    """`--piece reference`: the plain student's seconds per epoch here, the cost base of a machine
    that runs variants but no plain seed (tests/test_quality_machines.py has how the report uses it)."""
    proc = quality(recorded, "--piece", "reference", "--reference-epochs", "2")
    references = sorted((recorded / "records" / "references").glob("plain-*.json"))
    assert len(references) == 1
    record = json.loads(references[0].read_text())
    assert sorted(record["train_seconds_per_epoch"]) == ["1", "2"]
    assert all(seconds > 0 for seconds in record["train_seconds_per_epoch"].values())
    assert record["git"]["code_commit"] and record["seconds"] > sum(record["train_seconds_per_epoch"].values())
    assert f"add `references/{references[0].stem}` to this machine's `wrote`" in proc.stdout
    assert "[quality] report:" not in proc.stdout  # nothing the report shows changed
