"""Stage one end to end on the tiny teacher: content, resume after kill -9, corruption, mismatch, torchrun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache.errors import StoreError, StoreMismatch
from bevcache.extract import ExtractOptions, extract
from bevcache.store import open_store

from .conftest import CONFIGS, REPO, bevcache_cmd, tiny_cfg

TEACHER = str(CONFIGS / "tiny_teacher.py")


def _opts(data_root: Path, out: Path, **kw) -> ExtractOptions:
    base = dict(config=TEACHER, out=str(out), data_root=str(data_root), batch_size=2, num_workers=0,
                chunk_rows=4, dtype="float32", progress=False)
    base.update(kw)
    base.setdefault("random_init", not base.get("checkpoint"))
    return ExtractOptions(**base)


@pytest.fixture(scope="module")
def reference_store(data_root, teacher_ckpt, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "features.zarr"
    extract(_opts(data_root, out, checkpoint=teacher_ckpt, layers=["pts_neck", "pts_backbone"]))
    return out


def test_store_rows_equal_features_recomputed_from_the_model(reference_store, data_root, teacher_ckpt):
    from mmengine.dataset import pseudo_collate

    from bevcache.data import build_base_dataset, dataset_identity, test_pipeline
    from bevcache.extract import build_teacher
    from bevcache.features import LayerRecorder

    store = open_store(str(reference_store))
    info = store.info()
    assert info["num_samples"] == info["num_complete"] == 12 and info["complete"]
    assert info["layers"]["pts_neck"]["dim"] == 512  # SECONDFPN 128+128+256
    assert info["layers"]["pts_backbone"]["dim"] == 64 + 128 + 256  # list output: pooled per scale, concatenated
    cfg = tiny_cfg("tiny_teacher.py", data_root)
    model = build_teacher(cfg, teacher_ckpt, torch.device("cpu"))
    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
    assert store.tokens == dataset_identity(dataset)[0]
    table = store.read_table("pts_neck")
    for index in (0, 5, 11):
        data = model.data_preprocessor(pseudo_collate([dataset[index]]), False)
        with LayerRecorder(model, ["pts_neck"]) as rec, torch.no_grad():
            rec.run(model, **data, mode="predict")
            direct = rec.pooled("avg", 1)["pts_neck"][0]
        torch.testing.assert_close(table[index], direct, rtol=1e-4, atol=1e-5)


def test_fp16_store_matches_fp32_within_tolerance(reference_store, data_root, teacher_ckpt, tmp_path):
    out = tmp_path / "fp16.zarr"
    extract(_opts(data_root, out, checkpoint=teacher_ckpt, dtype="float16", chunk_rows=8, batch_size=3))
    half, full = open_store(str(out)).read_table("pts_neck"), open_store(str(reference_store)).read_table("pts_neck")
    torch.testing.assert_close(half, full, rtol=2e-3, atol=2e-3)


def test_existing_store_is_refused_without_resume_or_overwrite(reference_store, data_root, teacher_ckpt):
    with pytest.raises(StoreError, match="--resume .* --overwrite"):
        extract(_opts(data_root, reference_store, checkpoint=teacher_ckpt))


def test_resume_against_another_dataset_or_teacher_is_refused(reference_store, other_data_root, data_root, tmp_path):
    copy = tmp_path / "copy.zarr"
    shutil.copytree(reference_store, copy)
    with pytest.raises(StoreMismatch, match="dataset"):
        extract(_opts(other_data_root, copy, layers=["pts_neck", "pts_backbone"], resume=True))
    with pytest.raises(StoreMismatch, match="checkpoint"):
        extract(_opts(data_root, copy, layers=["pts_neck", "pts_backbone"], resume=True))  # no/other weights


def test_unknown_layer_is_a_clear_error(data_root, tmp_path):
    result = subprocess.run(bevcache_cmd("extract", "--config", TEACHER, "--data-root", str(data_root), "--out",
                                         str(tmp_path / "x.zarr"), "--layers", "pts_nek", "--random-init"),
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1
    assert "pts_nek" in result.stderr and "pts_neck" in result.stderr and "Traceback" not in result.stderr


def _run_killed(args: list[str], after_blocks: int = 1) -> int:
    """Run `bevcache *args`, SIGKILLed after its n-th durable block (tests/fault_injection.py)."""
    from .fault_injection import killed_cmd

    proc = subprocess.run(killed_cmd(after_blocks, *args), cwd=REPO, capture_output=True, text=True)
    return proc.returncode


def test_kill_9_then_resume_gives_the_identical_store(reference_store, data_root, teacher_ckpt, tmp_path):
    out = tmp_path / "killed.zarr"
    args = ["extract", "--config", TEACHER, "--checkpoint", teacher_ckpt, "--data-root", str(data_root),
            "--out", str(out), "--layers", "pts_neck,pts_backbone", "--batch-size", "2", "--num-workers", "0",
            "--chunk-rows", "4", "--dtype", "float32"]
    rc = _run_killed(args, 1)
    assert rc == -signal.SIGKILL
    partial = open_store(str(out))
    done = int(partial.complete_mask().sum())
    assert 0 < done < 12 and partial.verify()  # verify reports the missing rows
    result = subprocess.run(bevcache_cmd(*args, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resumed, ref = open_store(str(out)), open_store(str(reference_store))
    assert resumed.verify() == []
    for layer in ("pts_neck", "pts_backbone"):
        assert torch.equal(resumed.read_table(layer), ref.read_table(layer))


def test_kill_9_at_a_random_moment_loses_at_most_the_block_in_flight(data_root, teacher_ckpt, tmp_path):
    out = tmp_path / "random-kill.zarr"
    args = ["extract", "--config", TEACHER, "--checkpoint", teacher_ckpt, "--data-root", str(data_root),
            "--out", str(out), "--batch-size", "1", "--num-workers", "0", "--chunk-rows", "2", "--dtype", "float32"]
    proc = subprocess.Popen(bevcache_cmd(*args), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "complete").exists() and any((out / "complete").rglob("*")) and len(list((out / "complete").rglob("c*"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = open_store(str(out))
    mask = store.complete_mask()
    problems = store.verify()
    assert not any("checksum" in p.lower() or "corrupt" in p.lower() for p in problems), problems
    assert subprocess.run(bevcache_cmd(*args, "--resume"), cwd=REPO, capture_output=True).returncode == 0
    assert open_store(str(out)).verify() == [] and mask.sum() <= 12


def test_flipped_byte_fails_verify(reference_store, tmp_path):
    copy = tmp_path / "flip.zarr"
    shutil.copytree(reference_store, copy)
    chunk = sorted(p for p in (copy / "features").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    result = subprocess.run(bevcache_cmd("verify", str(copy)), capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 1 and "FAIL" in result.stderr
    ok = subprocess.run(bevcache_cmd("verify", str(reference_store)), capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr


def test_verify_against_a_different_dataset_fails(reference_store, data_root, other_data_root):
    good = subprocess.run(bevcache_cmd("verify", str(reference_store), "--config", TEACHER, "--data-root", str(data_root)),
                          capture_output=True, text=True, cwd=REPO)
    assert good.returncode == 0, good.stderr
    bad = subprocess.run(bevcache_cmd("verify", str(reference_store), "--config", TEACHER, "--data-root", str(other_data_root)),
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 1 and "dataset" in bad.stderr


def test_info_json(reference_store):
    result = subprocess.run(bevcache_cmd("info", str(reference_store), "--json"), capture_output=True, text=True, cwd=REPO)
    data = json.loads(result.stdout)
    for key in ("num_samples", "num_complete", "complete", "layers", "teacher", "dataset"):
        assert key in data
    assert data["layers"]["pts_neck"] == {"dim": 512, "dtype": "float32", "pooling": "avg"}


@pytest.mark.slow
def test_two_process_torchrun_equals_one_process(reference_store, data_root, teacher_ckpt, tmp_path):
    out = tmp_path / "ddp.zarr"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000), "-m", "bevcache.cli",
           "extract", "--config", TEACHER, "--checkpoint", teacher_ckpt, "--data-root", str(data_root), "--out", str(out),
           "--layers", "pts_neck,pts_backbone", "--batch-size", "2", "--num-workers", "0", "--chunk-rows", "4",
           "--dtype", "float32", "--launcher", "pytorch"]
    cmd[0] = str(Path(os.sys.executable).parent / "torchrun")
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp, ref = open_store(str(out)), open_store(str(reference_store))
    assert ddp.verify() == [] and ddp.tokens == ref.tokens
    for layer in ("pts_neck", "pts_backbone"):
        torch.testing.assert_close(ddp.read_table(layer), ref.read_table(layer), rtol=1e-5, atol=1e-6)
    assert np.array_equal(ddp.sample_idx, ref.sample_idx)


def test_a_second_extract_on_the_same_store_is_refused(data_root, teacher_ckpt, tmp_path):
    import fcntl

    out = tmp_path / "locked.zarr"
    with open(str(out) + ".lock", "a+") as held:  # what a running extraction holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="another `bevcache extract` is writing"):
            extract(_opts(data_root, out, checkpoint=teacher_ckpt))
    assert not out.exists()  # refused before touching the store
    extract(_opts(data_root, out, checkpoint=teacher_ckpt))  # lock released: fine
    assert open_store(str(out)).complete_mask().all()


def test_sigterm_flushes_finished_blocks_and_says_how_to_resume(data_root, teacher_ckpt, tmp_path):
    out = tmp_path / "term.zarr"
    args = ["extract", "--config", TEACHER, "--checkpoint", teacher_ckpt, "--data-root", str(data_root),
            "--out", str(out), "--batch-size", "1", "--num-workers", "0", "--chunk-rows", "2", "--dtype", "float32"]
    proc = subprocess.Popen(bevcache_cmd(*args), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "complete").exists() and len(list((out / "complete").rglob("c*"))) >= 1:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("extraction finished before SIGTERM arrived")
    assert proc.returncode == 1 and "--resume" in stderr and "Traceback" not in stderr
    store = open_store(str(out))
    assert 0 < store.complete_mask().sum() < 12
    assert subprocess.run(bevcache_cmd(*args, "--resume"), cwd=REPO, capture_output=True).returncode == 0
    assert open_store(str(out)).verify() == []


def test_a_teacher_without_weights_is_refused_unless_asked_for(data_root, tmp_path):
    from bevcache.errors import ConfigError

    with pytest.raises(ConfigError, match="--random-init"):
        extract(_opts(data_root, tmp_path / "r.zarr", random_init=False))
    assert not (tmp_path / "r.zarr").exists()


def test_the_store_records_the_teacher_weights_and_load_from_is_honoured(data_root, teacher_ckpt, tmp_path):
    from bevcache.runtime import load_config
    from bevcache.teacher import build_teacher, weights_sha256

    config = tmp_path / "teacher_load_from.py"
    config.write_text(f"_base_ = [{TEACHER!r}]\nload_from = {teacher_ckpt!r}\n")
    extract(_opts(data_root, tmp_path / "lf.zarr", config=str(config)))  # no --checkpoint: load_from
    teacher = open_store(str(tmp_path / "lf.zarr")).attrs["teacher"]
    expected = weights_sha256(build_teacher(load_config(TEACHER), teacher_ckpt, "cpu"))
    assert teacher["weights_sha256"] == expected and teacher["checkpoint"] == teacher_ckpt
    assert teacher["config_sha256"] and not teacher["random_init"]


def test_resume_after_a_kill_with_other_random_weights_is_refused(data_root, tmp_path):
    """Two random teachers are two teachers: a resumed random-init extraction names both weight hashes."""
    out = tmp_path / "random.zarr"
    args = ["extract", "--config", TEACHER, "--random-init", "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--chunk-rows", "4"]
    assert _run_killed(args, 1) == -signal.SIGKILL
    stored = open_store(str(out)).attrs["teacher"]["weights_sha256"]
    result = subprocess.run(bevcache_cmd(*args, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: --resume with other teacher weights") and stored[:16] in line
    assert 0 < int(open_store(str(out)).complete_mask().sum()) < 12  # nothing mixed in


def test_spatial_layers_are_stored_with_their_pooled_vectors(data_root, teacher_ckpt, tmp_path):
    from bevcache.features import LayerRecorder, spatial_map
    from bevcache.teacher import build_teacher

    out = tmp_path / "spatial.zarr"
    extract(_opts(data_root, out, checkpoint=teacher_ckpt, spatial="pts_neck=16x8", dtype="float32"))
    store = open_store(str(out))
    assert set(store.layers) == {"pts_neck"} and store.spatial["pts_neck"].shape == (512, 16, 8)
    cfg = tiny_cfg("tiny_teacher.py", data_root, batch_size=1)
    model = build_teacher(cfg, teacher_ckpt, "cpu")
    from mmengine.dataset import pseudo_collate

    from bevcache.data import build_base_dataset, test_pipeline

    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
    with LayerRecorder(model, ["pts_neck"], stop_early=True) as rec, torch.no_grad():
        data = model.data_preprocessor(pseudo_collate([dataset[5]]), False)
        rec.run(model, **data, mode="predict")
        expected = spatial_map(rec.outputs["pts_neck"], (16, 8))[0].numpy()
    np.testing.assert_allclose(store.read_spatial("pts_neck", [5])[0].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    pooled = store.read_table("pts_neck")[5].numpy()
    np.testing.assert_allclose(pooled, expected.mean(axis=(1, 2)), rtol=1e-3, atol=1e-3)


def test_database_files_are_checked_only_when_the_train_pipeline_runs(data_root, tmp_path):
    """ObjectSample's database is read by the train pipeline: extraction without views (the test
    pipeline) does not need it, as mmdet3d's tools/test.py does not; with views it is named up front."""
    from bevcache.errors import ConfigError

    config = tmp_path / "teacher_with_object_sample.py"
    config.write_text(
        f"_base_ = [{str(CONFIGS / 'tiny_teacher.py')!r}]\n"
        "db_sampler = dict(data_root='data/synthetic-nus/', info_path='data/synthetic-nus/no_such_dbinfos.pkl', "
        "rate=1.0, prepare=dict(), classes=['car'], sample_groups=dict(car=2), "
        "points_loader=dict(type='LoadPointsFromFile', coord_type='LIDAR', load_dim=5, use_dim=4))\n"
        "train_dataloader = dict(dataset=dict(pipeline=[{{_base_.load_points}}, "
        "dict(type='LoadAnnotations3D', with_bbox_3d=True, with_label_3d=True), "
        "dict(type='ObjectSample', db_sampler=db_sampler), "
        "dict(type='Pack3DDetInputs', keys=['points', 'gt_bboxes_3d', 'gt_labels_3d'], "
        "meta_keys={{_base_.pack_meta_keys}})]))\n")
    pooled = extract(_opts(data_root, tmp_path / "pooled.zarr", config=str(config)))
    assert pooled["num_complete"] == pooled["num_samples"]
    with pytest.raises(ConfigError, match=r"db_sampler\.info_path = .*no_such_dbinfos\.pkl does not exist"):
        extract(_opts(data_root, tmp_path / "views.zarr", config=str(config), views=1))
    assert not (tmp_path / "views.zarr").exists()
