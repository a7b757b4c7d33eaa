"""The real camera + LiDAR BEVFusion teacher (mmdetection3d's projects/BEVFusion) through bevcache on CPU.

Skipped unless an mmdetection3d checkout is found ($MMDET3D_ROOT, else ../mmdetection3d beside the
repository), as tests/test_bevfusion.py. Runs configs/bevfusion/teacher_lidar_cam_small.py (48 x 48
LiDAR BEV, six 128 x 352 images, ~4 s per teacher forward on one thread) on `bevcache synth --cameras`
data (4 train / 2 val samples, one sweep), batch 1, through the `bevcache` command line.

The camera branch alone cannot be a student with the real model class: `BEVFusion.__init__` builds
`pts_middle_encoder` unconditionally (MODELS.build(None) raises) and `extract_feat` always runs the
LiDAR branch (and without a fusion layer asserts a single feature map). test_camera_only_is_not_possible
pins that; bevcache's own camera-only model is configs/tiny_camera_student.py (tests/test_camera.py).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from .conftest import (
    CONFIGS,
    MMDET3D_CHECKOUT,
    bevcache_cmd,
    needs_checkout_files,
    one_intra_op_thread,
)
from .conftest import run_command as run

CHECKOUT = MMDET3D_CHECKOUT
pytestmark = needs_checkout_files(
    "projects/BEVFusion/configs/bevfusion_lidar-cam_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py",
    "projects/BEVFusion/configs/bevfusion_lidar_voxel0075_second_secfpn_8xb4-cyclic-20e_nus-3d.py",
    "configs/_base_/default_runtime.py")
TEACHER_FULL = CONFIGS / "bevfusion" / "teacher_lidar_cam.py"
TEACHER = CONFIGS / "bevfusion" / "teacher_lidar_cam_small.py"
STUDENT = CONFIGS / "bevfusion" / "student_lidar_small.py"
TRAIN_SAMPLES, VAL_SAMPLES = 4, 2
TIMES: dict[str, float] = {}  # wall time per CLI command (shown by `pytest -rA` in the last test's output)


@pytest.fixture(scope="module")
def env():
    """Environment of every subprocess: the checkout named by MMDET3D_ROOT alone (no PYTHONPATH)."""
    before = os.environ.get("MMDET3D_ROOT")
    os.environ["MMDET3D_ROOT"] = str(CHECKOUT)  # for this process too (bevcache.bevfusion_cpu reads it)
    yield {**os.environ, "MMDET3D_ROOT": str(CHECKOUT)}
    if before is None:
        os.environ.pop("MMDET3D_ROOT")
    else:
        os.environ["MMDET3D_ROOT"] = before


def cli(*args, env: dict, ok: bool = True):
    start = time.perf_counter()
    proc = run(bevcache_cmd(*map(str, args)), env, ok=ok)
    TIMES[" ".join(str(a) if not isinstance(a, Path) else a.name for a in args[:3])] = time.perf_counter() - start
    return proc


def small_cfg(data_root: Path | None = None, path: Path = TEACHER):
    from bevcache.data import set_data_root
    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    cfg = load_config(path)
    if data_root is not None:
        set_data_root(cfg, str(data_root))
    return cfg


@pytest.fixture(scope="module")
def cam_data(tmp_path_factory, env) -> Path:
    root = tmp_path_factory.mktemp("bevfusion-cam") / "data"
    cli("synth", root, "--samples", TRAIN_SAMPLES, "--val-samples", VAL_SAMPLES, "--seed", 0, "--sweeps", 1,
        "--cameras", env=env)
    return root


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory, env) -> Path:
    """A randomly initialised fused teacher (BN statistics perturbed), saved by mmengine (keeps _metadata)."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import save_checkpoint

    cfg = small_cfg()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS.build(copy.deepcopy(cfg.model))  # BEVFusion.__init__ pops keys of its config
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("bevfusion-cam-ckpt") / "teacher.pth"
    save_checkpoint({"state_dict": model.state_dict(), "meta": {"test": "random init"}}, str(path))
    return path


@pytest.fixture(scope="module")
def neck_store(tmp_path_factory, cam_data, teacher_checkpoint, env) -> Path:
    out = tmp_path_factory.mktemp("bevfusion-cam-store") / "neck.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", cam_data,
        "--out", out, "--batch-size", 1, "--num-workers", 0, env=env)
    return out


# ---------------------------------------------------------------------------------------------
# 1. The configs


def test_swin_pretrained_weights_are_never_downloaded(env, monkeypatch):
    """The full-size fused teacher builds and initialises without following Swin's init_cfg URL."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import checkpoint as ckpt

    def no_download(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    for name in ("load_from_http", "load_url"):
        if hasattr(ckpt, name):
            monkeypatch.setattr(ckpt, name, no_download)
    cfg = small_cfg(path=TEACHER_FULL)
    assert cfg.model.img_backbone.init_cfg is None
    assert small_cfg().model.img_backbone.init_cfg is None
    model = MODELS.build(copy.deepcopy(cfg.model))
    model.init_weights()
    assert type(model.img_backbone).__name__ == "SwinTransformer"
    assert model.view_transform.image_size == [256, 704]  # the project's own camera branch, unchanged


def test_small_config_grids_agree(env):
    """Camera BEV (after the 2x downsample) = LiDAR BEV; images, depth map and frustum share one size."""
    cfg = small_cfg()
    vt, grid = cfg.model.view_transform, cfg.model.pts_middle_encoder.sparse_shape
    lidar_bev = grid[0] // 8  # BEVFusionSparseEncoder's 8x downsampling
    camera_bev = [round((hi - lo) / step) // vt.downsample for lo, hi, step in (vt.xbound, vt.ybound)]
    assert camera_bev == [lidar_bev, grid[1] // 8] == [48, 48]
    assert vt.xbound[:2] == cfg.model.data_preprocessor.voxelize_cfg.point_cloud_range[0:4:3]
    assert vt.feature_size == [s // 8 for s in vt.image_size]
    train_aug, test_aug = (next(step for step in pipeline if step["type"] == "ImageAug3D")
                           for pipeline in (cfg.train_dataloader.dataset.dataset.pipeline, cfg.test_pipeline))
    assert train_aug.final_dim == test_aug.final_dim == vt.image_size
    # resize_lim is relative to the stored image: the project's limits for 1600 px wide images, halved
    # with the crop, are x 1600 / 384 / 2 for the synthetic images (its train range still pads, as upstream)
    assert test_aug.resize_lim == [1.0, 1.0]  # 0.48 of 1600 px = 768 = 2 x 384
    assert train_aug.resize_lim == pytest.approx([0.38 * 1600 / 768, 0.55 * 1600 / 768], abs=1e-4)
    assert 384 * test_aug.resize_lim[0] >= vt.image_size[1] and 216 * test_aug.resize_lim[0] >= vt.image_size[0]


def test_camera_only_is_not_possible_with_the_real_model_class(env):
    """Why there is no student_camera_small.py: BEVFusion always builds and runs the LiDAR branch."""
    from mmdet3d.registry import MODELS

    cfg = small_cfg()
    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.update(pts_middle_encoder=None, fusion_layer=None)
    with pytest.raises(TypeError, match="cfg should be a dict"):
        MODELS.build(model_cfg)


# ---------------------------------------------------------------------------------------------
# 2. bevcache extract / info / verify with the fused teacher


def teacher_neck(cfg, checkpoint: Path, index: int):
    """pts_neck of train sample `index` through the test pipeline, computed here without bevcache's hooks,
    as a function of an optional change of the (normalised) images."""
    from mmengine.dataset import pseudo_collate

    from bevcache.data import build_base_dataset, test_pipeline
    from bevcache.teacher import build_teacher

    model = build_teacher(cfg, str(checkpoint), "cpu")
    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))  # one sweep: nothing random in it
    batch = model.data_preprocessor(pseudo_collate([dataset[index]]), False)
    assert batch["inputs"]["imgs"].shape == (1, 6, 3, 128, 352)
    metas = [s.metainfo for s in batch["data_samples"]]

    def neck(images=None) -> torch.Tensor:
        inputs = dict(batch["inputs"])
        if images is not None:
            inputs["imgs"] = images(inputs["imgs"])
        with torch.no_grad():
            (out,) = model.extract_feat(copy.deepcopy(inputs), metas)
        return out

    return neck


@pytest.mark.slow
def test_extract_pooled_pts_neck_is_the_fused_forward(neck_store, cam_data, teacher_checkpoint, env):
    from bevcache.store import open_store

    store = open_store(str(neck_store))
    assert store.num_samples == TRAIN_SAMPLES and store.complete_mask().all() and store.verify() == []
    assert store.layers["pts_neck"].dim == 512  # the LiDAR-only teacher's width: ConvFuser feeds the same backbone
    table = store.read_table("pts_neck").float()
    assert torch.isfinite(table).all() and table.std(0).max() > 0

    with one_intra_op_thread():  # spconv on the CPU is reproducible with one thread only
        forward = teacher_neck(small_cfg(cam_data), teacher_checkpoint, 1)
        neck = forward()
        assert neck.shape == (1, 512, 48, 48)
        torch.testing.assert_close(table[1], neck.mean((2, 3))[0], atol=2e-3, rtol=2e-3)  # float16 store
        # The cameras reach pts_neck (fused before pts_backbone): the same forward is bit-identical, one
        # with black images is not. The change is small with random weights (the backbone's BN shifts
        # dominate activations of ~1e-3 from either branch) but far above float rounding.
        assert torch.equal(forward(), neck)
        dark = forward(torch.zeros_like)
    assert (dark - neck).abs().max() > 1e-5 * neck.abs().max()


@pytest.mark.slow
def test_extract_spatial_pts_neck(tmp_path, neck_store, cam_data, teacher_checkpoint, env):
    from bevcache.store import open_store

    out = tmp_path / "spatial.zarr"
    cli("extract", "--config", TEACHER, "--checkpoint", teacher_checkpoint, "--data-root", cam_data,
        "--out", out, "--batch-size", 1, "--num-workers", 0, "--spatial", "pts_neck=12", env=env)
    store = open_store(str(out))
    assert store.complete_mask().all() and store.verify() == []
    maps = store.read_spatial("pts_neck", np.arange(TRAIN_SAMPLES)).astype(np.float32)
    assert maps.shape == (TRAIN_SAMPLES, 512, 12, 12)
    # 48 -> 12 by 4 x 4 means: their mean is the pooled vector of the same forward
    pooled = open_store(str(neck_store)).read_table("pts_neck").float().numpy()
    np.testing.assert_allclose(maps.mean((2, 3)), pooled, atol=5e-3, rtol=5e-3)


@pytest.mark.slow
def test_info_and_verify_against_the_config(neck_store, cam_data, env):
    info = cli("info", neck_store, env=env).stdout
    assert "4/4 complete" in info and "pts_neck: dim 512" in info and "teacher_lidar_cam_small.py" in info
    proc = cli("verify", neck_store, "--config", TEACHER, "--data-root", cam_data, env=env)
    ok = [line for line in proc.stdout.splitlines() if line.startswith("OK:")]  # after mmengine's dataset log
    assert len(ok) == 1 and "matches it: 4 samples in the same order" in ok[0], proc.stdout[-2000:]


# ---------------------------------------------------------------------------------------------
# 3. A LiDAR-only student from the fused teacher's cache


@pytest.mark.slow
def test_lidar_student_from_the_fused_cache(tmp_path, neck_store, cam_data, env):
    """student_lidar_small.py (pts_neck 256) distils the fused teacher's 512-d rows (CRD embeds both),
    and its exported weights load strictly into the full-grid student_lidar.py."""
    from mmdet3d.registry import MODELS
    from mmengine.runner import load_checkpoint

    work = tmp_path / "run"
    proc = cli("train", "--student", STUDENT, "--cache", neck_store, "--data-root", cam_data, "--max-iters", 2,
               "--work-dir", work, env=env)
    out = proc.stdout + proc.stderr
    assert (work / "iter_2.pth").is_file() and (work / "student_weights.pth").is_file()
    assert "Iter(train) [2/2]" in out and "loss_crd_pts_neck" in out
    exported = tmp_path / "student.pth"
    cli("export-student", work / "iter_2.pth", exported, env=env)
    model = MODELS.build(copy.deepcopy(small_cfg(path=CONFIGS / "bevfusion" / "student_lidar.py").model))
    load_checkpoint(model, str(exported), map_location="cpu", strict=True)  # spconv layout from _metadata
    trained = torch.load(work / "iter_2.pth", map_location="cpu", weights_only=False)["state_dict"]
    weight = "pts_middle_encoder.conv_input.0.weight"
    assert torch.equal(model.state_dict()[weight], trained[f"student.{weight}"])
    assert not any(k.startswith(("teacher.", "img_")) for k in torch.load(exported, weights_only=False)["state_dict"])
    print("wall time per command:", {k: round(v, 1) for k, v in TIMES.items()})


@pytest.mark.slow
def test_lidar_student_with_the_online_fused_teacher(tmp_path, cam_data, teacher_checkpoint, env):
    """The online reference where teacher and student read different inputs: one loader loads the
    cameras for the fused teacher; the LiDAR student (whose Pack3DDetInputs lists 'img' although
    nothing loads one) never sees them."""
    work = tmp_path / "online"
    proc = cli("train", "--student", STUDENT, "--teacher-online", TEACHER, "--teacher-checkpoint", teacher_checkpoint,
               "--data-root", cam_data, "--max-iters", 2, "--work-dir", work, env=env)
    out = proc.stdout + proc.stderr
    assert (work / "iter_2.pth").is_file() and "loss_crd_pts_neck" in out
