"""The fused camera + LiDAR teacher through every command, in CI: the tiny FusedCenterPoint
(bevcache.fusion, BEVFusion's structure) on `bevcache synth --cameras` data, distilled into the LiDAR
student (its loader never opens an image) and into the camera-only student."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mmengine.hooks import Hook

from bevcache.cli import main
from bevcache.extract import ExtractOptions, extract
from bevcache.store import open_store
from bevcache.train import TrainOptions, build_train_config

from .conftest import CONFIGS, assert_cached_equals_online, iteration_run, one_intra_op_thread

FUSED = str(CONFIGS / "tiny_fused_teacher.py")
LIDAR_STUDENT = str(CONFIGS / "tiny_voxel_student.py")
CAMERA_STUDENT = str(CONFIGS / "tiny_camera_student.py")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_intra_op_thread():  # spconv on the CPU is bit-reproducible with one thread only
        yield


@pytest.fixture(scope="module")
def camera_root(tmp_path_factory) -> Path:
    from bevcache.synth import generate

    root = tmp_path_factory.mktemp("synthetic-nus-cam")
    generate(root, num_train=12, num_val=4, seed=0, cameras=True)
    return root


@pytest.fixture(scope="module")
def fused_ckpt(camera_root, tmp_path_factory) -> str:
    """The fused teacher trained a few iterations on the synthetic cameras (`bevcache train --plain`)."""
    from mmengine.runner import Runner

    work = tmp_path_factory.mktemp("fused-teacher")
    with one_intra_op_thread():
        cfg = build_train_config(TrainOptions(student=FUSED, plain=True, data_root=str(camera_root)))
        Runner.from_cfg(iteration_run(cfg, work_dir=work, iters=4, batch_size=2, seed=5, checkpoint_interval=4)).train()
    return str(work / "iter_4.pth")


@pytest.fixture(scope="module")
def fused_store(camera_root, fused_ckpt, tmp_path_factory) -> str:
    """Pooled pts_neck and pts_backbone plus spatial pts_neck maps of the fused teacher, float32."""
    out = tmp_path_factory.mktemp("fused-store") / "features.zarr"
    with one_intra_op_thread():  # a module fixture is set up before the autouse one
        extract(ExtractOptions(config=FUSED, checkpoint=fused_ckpt, out=str(out), data_root=str(camera_root),
                               layers="pts_neck,pts_backbone", spatial="pts_neck=8", batch_size=2, num_workers=0,
                               chunk_rows=4, dtype="float32", progress=False))
    return str(out)


class Recorder(Hook):
    """Per-iteration losses, the samples that reached the model, and what the loader packed."""

    def __init__(self):
        self.losses, self.samples, self.batch_inputs = [], [], []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append({k: float(v) for k, v in outputs.items()})
        self.samples += [int(s.metainfo["sample_idx"]) for s in data_batch["data_samples"]]
        self.batch_inputs.append(sorted(data_batch["inputs"]))


def run(cfg, work_dir: Path, iters: int):
    from mmengine.runner import Runner

    runner = Runner.from_cfg(iteration_run(cfg, work_dir=work_dir, iters=iters, batch_size=2, seed=7))
    rec = Recorder()
    runner.register_hook(rec)
    seen = []  # the keys of every input dict the student's own preprocessor received
    student = getattr(runner.model, "student", None)
    if student is not None:
        student.data_preprocessor.register_forward_pre_hook(lambda m, args: seen.append(sorted(args[0]["inputs"])))
    runner.train()
    return runner, rec, seen


def test_the_store_holds_the_fused_teacher_and_its_camera_knowledge(camera_root, fused_ckpt, fused_store):
    """Rows are the (trained) fused teacher's own forward on the un-augmented sample; blanking the
    images changes pts_neck, so the cached features carry what the cameras saw."""
    from mmengine.dataset import pseudo_collate

    from bevcache.data import build_base_dataset, test_pipeline
    from bevcache.features import LayerRecorder, pool_output
    from bevcache.runtime import load_config
    from bevcache.teacher import build_teacher

    store = open_store(fused_store)
    assert set(store.layers) == {"pts_neck", "pts_backbone"} and store.layers["pts_neck"].dim == 512
    assert (store.spatial["pts_neck"].channels, store.spatial["pts_neck"].height) == (512, 8)
    cfg = load_config(FUSED)
    from bevcache.data import set_data_root

    set_data_root(cfg, str(camera_root))
    teacher = build_teacher(cfg, fused_ckpt, torch.device("cpu"))
    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
    batch = teacher.data_preprocessor(pseudo_collate([dataset[3]]), False)
    assert batch["inputs"]["imgs"].shape[:2] == (1, 6)  # six cameras reach the teacher
    with torch.no_grad(), LayerRecorder(teacher, ["pts_neck"]) as rec:
        teacher(**batch, mode="predict")
        live = pool_output(rec.outputs["pts_neck"], "avg", 1)
        batch["inputs"]["imgs"] = torch.zeros_like(batch["inputs"]["imgs"])
        rec.outputs.clear()
        teacher(**batch, mode="predict")
        blind = pool_output(rec.outputs["pts_neck"], "avg", 1)
    cached = store.read_table("pts_neck")[3:4]
    torch.testing.assert_close(cached, live, rtol=1e-4, atol=1e-5)
    assert (live - blind).abs().max() > 1e-3


def test_info_and_verify_with_the_fused_config(camera_root, fused_store):
    info = CliRunner().invoke(main, ["info", fused_store])
    assert info.exit_code == 0 and "spatial    pts_neck: [512, 8, 8]" in info.output
    verify = CliRunner().invoke(main, ["verify", fused_store, "--config", FUSED, "--data-root", str(camera_root)])
    assert verify.exit_code == 0, verify.output
    assert "matches it: 12 samples in the same order" in verify.output


def test_cached_lidar_student_equals_the_online_fused_reference(camera_root, fused_ckpt, fused_store, tmp_path):
    """One loader feeds both in the online run: images and points for the teacher, the points alone
    for the LiDAR student; its losses and weights equal the cached run's."""
    cached_runner, cached, cached_seen = run(build_train_config(TrainOptions(
        student=LIDAR_STUDENT, data_root=str(camera_root), cache=fused_store,
        distill_options=["layers={'pts_neck': 'pts_neck'}"])), tmp_path / "cached", 3)
    online_runner, online, online_seen = run(build_train_config(TrainOptions(
        student=LIDAR_STUDENT, data_root=str(camera_root), teacher_online=FUSED, teacher_checkpoint=fused_ckpt)),
        tmp_path / "online", 3)
    assert all(keys == ["points"] for keys in cached.batch_inputs)  # the cached loader never opens an image
    assert all(keys == ["img", "points"] for keys in online.batch_inputs)  # one loader, the teacher's images too
    assert cached_seen and all(keys == ["points"] for keys in cached_seen + online_seen)  # the student: points only
    assert online_runner.model.teacher_inputs == ("img",)
    assert cached.samples == online.samples
    assert_cached_equals_online(cached_runner, cached.losses, online_runner, online.losses)


def test_cached_spatial_warp_and_strict_export(camera_root, fused_store, tmp_path):
    """Spatial maps of the fused teacher, warped into the LiDAR student's augmented frame; the
    exported student loads strictly into its own config."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import load_checkpoint

    from bevcache.runtime import load_config

    work = tmp_path / "spatial"
    augmented = tmp_path / "student_augmented.py"  # rotation, scale, flips: the warp has work to do
    augmented.write_text(f"_base_ = [{LIDAR_STUDENT!r}]\n"
                         "train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_train_pipeline}}))\n")
    result = CliRunner().invoke(main, [
        "train", "--student", str(augmented), "--cache", fused_store, "--data-root", str(camera_root),
        "--work-dir", str(work), "--max-iters", "2",
        "--cfg-options", "train_dataloader.num_workers=0", "train_dataloader.persistent_workers=False",
        "--distill", "spatial={'grid': (8, 8)}"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "student.pth"
    export = CliRunner().invoke(main, ["export-student", str(work / "iter_2.pth"), str(out)])
    assert export.exit_code == 0, export.output
    student = MODELS.build(load_config(LIDAR_STUDENT).model)
    load_checkpoint(student, str(out), strict=True)


def test_camera_only_student_distils_from_the_fused_cache(camera_root, fused_store, tmp_path):
    runner, rec, seen = run(build_train_config(TrainOptions(
        student=CAMERA_STUDENT, data_root=str(camera_root), cache=fused_store)), tmp_path / "camera", 2)
    assert all(keys == ["img"] for keys in rec.batch_inputs)  # no points are loaded for the camera student
    assert all(np.isfinite(v) for loss in rec.losses for v in loss.values())
    assert rec.losses[0]["loss_crd_pts_neck"] > 0


def test_lidar_student_replays_the_fused_teachers_augmented_views(camera_root, fused_ckpt, tmp_path):
    """Views through the fused teacher's augmented pipeline (rotation, scale, flips, then its images):
    the LiDAR student's pipeline is the same without the camera steps, and every view's LiDAR input
    is proven identical by its digest before its cached row is used."""
    store = tmp_path / "views.zarr"
    with one_intra_op_thread():
        extract(ExtractOptions(config=FUSED, checkpoint=fused_ckpt, out=str(store), data_root=str(camera_root),
                               views=2, batch_size=2, num_workers=0, chunk_rows=4, dtype="float32",
                               progress=False))
    assert open_store(str(store)).num_views == 2
    augmented = tmp_path / "student_augmented.py"  # the LiDAR half of the teacher's train pipeline
    augmented.write_text(f"_base_ = [{LIDAR_STUDENT!r}]\n"
                         "train_dataloader = dict(dataset=dict(pipeline={{_base_.augmented_train_pipeline}}))\n")
    runner, rec, seen = run(build_train_config(TrainOptions(
        student=str(augmented), data_root=str(camera_root), cache=str(store))), tmp_path / "replay", 3)
    assert runner.model.augmentation == "replay"
    assert all(keys == ["points"] for keys in seen)
    assert all(np.isfinite(v) for loss in rec.losses for v in loss.values())


def test_the_teacher_inputs_are_decided_by_loading_steps_not_pack_keys(camera_root):
    """BEVFusion-L's LiDAR student packs 'img' although nothing loads one: the fused teacher's image
    steps are still added to the one loader (else the teacher would run without its cameras)."""
    from bevcache.data import set_data_root, unwrap_dataset_cfg
    from bevcache.inputs import add_teacher_inputs
    from bevcache.runtime import load_config

    student, teacher = load_config(LIDAR_STUDENT), load_config(FUSED)
    set_data_root(student, str(camera_root))
    pipeline = unwrap_dataset_cfg(student.train_dataloader.dataset).pipeline
    pipeline[-1]["keys"] = [*pipeline[-1]["keys"], "img"]
    assert add_teacher_inputs(student, teacher) == ("img",)
    types = [s["type"] for s in unwrap_dataset_cfg(student.train_dataloader.dataset).pipeline]
    assert types[-2:] == ["LoadMultiViewImageFromFiles", "Pack3DDetInputs"]
    assert add_teacher_inputs(load_config(FUSED), teacher) == ()  # a student that loads images itself
