"""The tiny voxel pair (hard voxelization -> spconv SparseEncoder -> SECOND -> SECONDFPN, BEVFusion-L's
LiDAR trunk) through the same paths as the pillar pair: extract, kill -9 + resume, cached training
with resume, online reference, export. Sparse-conv weights depend on the state dict's `_metadata`,
which the pillar model never exercised.

spconv's sparse convolutions on the CPU are not run-to-run reproducible with more than one intra-op
thread (measured: pts_middle_encoder outputs differ by up to 0.05 between two identical forwards
with 2 threads, pts_neck by 1e-3; bit-identical with 1). The bitwise resume checks below therefore
run every teacher and student forward, in-process and in subprocesses, on one thread.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch

from bevcache.extract import ExtractOptions, extract
from bevcache.store import open_store
from bevcache.train import TrainOptions, build_train_config

from .conftest import CONFIGS, REPO, bevcache_cmd, one_intra_op_thread, tiny_cfg
from .test_train import run, short_run

TEACHER = str(CONFIGS / "tiny_voxel_teacher.py")
STUDENT = str(CONFIGS / "tiny_voxel_student.py")


@pytest.fixture(autouse=True)
def _one_thread():
    with one_intra_op_thread():
        yield


@pytest.fixture(scope="module")
def voxel_teacher_ckpt(tmp_path_factory) -> str:
    """Random, fixed voxel-teacher weights saved the mmengine way (the state dict keeps `_metadata`)."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import save_checkpoint

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    torch.manual_seed(11)
    model = MODELS.build(load_config(TEACHER).model)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("voxel-teacher") / "teacher.pth"
    save_checkpoint({"state_dict": model.state_dict(), "meta": {}}, str(path))
    return str(path)


def _args(data_root: Path, ckpt: str, out: Path) -> list[str]:
    return ["extract", "--config", TEACHER, "--checkpoint", ckpt, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "2", "--num-workers", "0", "--chunk-rows", "4", "--dtype", "float32"]


@pytest.fixture(scope="module")
def voxel_store(data_root, voxel_teacher_ckpt, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("voxel-store") / "features.zarr"
    with one_intra_op_thread():  # a module fixture is set up before the autouse one
        extract(ExtractOptions(config=TEACHER, checkpoint=voxel_teacher_ckpt, out=str(out), data_root=str(data_root),
                               batch_size=2, num_workers=0, chunk_rows=4, dtype="float32", progress=False))
    return str(out)


def test_extracted_rows_are_the_spconv_teacher_and_kill_9_resume_is_identical(
        data_root, voxel_teacher_ckpt, voxel_store, tmp_path):
    from mmengine.dataset import pseudo_collate

    from bevcache.data import build_base_dataset, test_pipeline
    from bevcache.features import LayerRecorder
    from bevcache.teacher import build_teacher, weights_sha256

    store = open_store(voxel_store)
    assert store.layers["pts_neck"].dim == 512
    cfg = tiny_cfg("tiny_voxel_teacher.py", data_root)
    model = build_teacher(cfg, voxel_teacher_ckpt, "cpu")
    assert store.attrs["teacher"]["weights_sha256"] == weights_sha256(model)
    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
    with LayerRecorder(model, ["pts_neck"], stop_early=True) as rec, torch.no_grad():
        data = model.data_preprocessor(pseudo_collate([dataset[7]]), False)
        rec.run(model, **data, mode="predict")
        torch.testing.assert_close(store.read_table("pts_neck")[7], rec.pooled("avg", 1)["pts_neck"][0],
                                   rtol=1e-4, atol=1e-5)

    from .fault_injection import killed_cmd

    out = tmp_path / "killed.zarr"
    killed = subprocess.run(killed_cmd(1, *_args(data_root, voxel_teacher_ckpt, out)), cwd=REPO, capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    resumed = subprocess.run(bevcache_cmd(*_args(data_root, voxel_teacher_ckpt, out), "--resume"), cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert torch.equal(open_store(str(out)).read_table("pts_neck"), store.read_table("pts_neck"))


def test_cached_training_resumes_and_exports_a_strictly_loadable_spconv_student(data_root, voxel_store, tmp_path):
    from mmdet3d.apis import init_model
    from mmengine.runner import load_checkpoint

    from bevcache.teacher import build_model, export_student

    def cfg():
        return build_train_config(TrainOptions(student=STUDENT, data_root=str(data_root), cache=voxel_store))

    _, full = run(short_run(cfg(), tmp_path / "full", 3))
    run(short_run(cfg(), tmp_path / "part", 2, ckpt_interval=2))
    _, resumed = run(short_run(build_train_config(TrainOptions(
        student=STUDENT, data_root=str(data_root), cache=voxel_store, resume=str(tmp_path / "part" / "iter_2.pth"))),
        tmp_path / "part", 3))
    assert "loss_crd_pts_neck" in full.losses[0] and len(resumed.losses) == 1
    for key, value in full.losses[2].items():
        assert resumed.losses[0][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    out = export_student(str(tmp_path / "full" / "iter_3.pth"), str(tmp_path / "student.pth"))
    student = build_model(tiny_cfg("tiny_voxel_student.py", data_root).model)
    load_checkpoint(student, out, map_location="cpu", strict=True)
    assert init_model(STUDENT, out, device="cpu") is not None


def test_online_reference_builds_from_an_unmutated_config(data_root, voxel_teacher_ckpt, tmp_path):
    _, rec = run(short_run(build_train_config(TrainOptions(
        student=STUDENT, data_root=str(data_root), teacher_online=TEACHER, teacher_checkpoint=voxel_teacher_ckpt)),
        tmp_path, 1))
    assert rec.losses[0]["loss_crd_pts_neck"] > 0
