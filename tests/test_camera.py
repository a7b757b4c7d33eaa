"""The camera branch (bevcache.camera.LSSViewTransform) and the tiny fused / camera-only detectors.

Geometry is checked against hand-made cameras (a feature at a known pixel and depth must land in the
BEV cell of that 3D point, in the LiDAR voxeliser's own cell layout); the detectors are built from
their configs and run loss + backward + predict on fake batches (no data root, no checkout).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from .conftest import CONFIGS, one_intra_op_thread

CAMERAS = ["CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_FRONT_LEFT", "CAM_BACK", "CAM_BACK_LEFT", "CAM_BACK_RIGHT"]
YAWS = [0.0, -55.0, 55.0, 180.0, 110.0, -110.0]  # degrees, left of the LiDAR's +x is positive
GRID = dict(xbound=[-25.6, 25.6, 1.6], ybound=[-25.6, 25.6, 1.6], zbound=[-5.0, 3.0, 8.0])  # the tiny grid
IMG_H, IMG_W = 64, 176  # fake network input: nuScenes' 900 x 1600 aspect ratio, small


def camera(yaw_deg: float, position=(0.0, 0.0, 0.0), f: float = 80.0, size=(IMG_H, IMG_W)):
    """(cam2img 3x3, lidar2cam 4x4) of a pinhole camera at `position` looking along LiDAR yaw `yaw_deg`."""
    yaw = math.radians(yaw_deg)
    forward = np.array([math.cos(yaw), math.sin(yaw), 0.0])
    right = np.array([math.sin(yaw), -math.cos(yaw), 0.0])
    down = np.array([0.0, 0.0, -1.0])
    cam2lidar = np.eye(4)
    cam2lidar[:3, :3] = np.stack([right, down, forward], 1)  # columns: camera x, y, z axes in the LiDAR frame
    cam2lidar[:3, 3] = position
    h, w = size
    k = np.array([[f, 0, (w - 1) / 2], [0, f, (h - 1) / 2], [0, 0, 1.0]])
    return k, np.linalg.inv(cam2lidar)


def as4x4(m: np.ndarray) -> torch.Tensor:
    """A 3x3 or 4x4 matrix as a float32 [1, 1, 4, 4] tensor (batch 1, one camera)."""
    out = np.eye(4)
    out[:m.shape[0], :m.shape[1]] = m
    return torch.tensor(out, dtype=torch.float32)[None, None]


def expected_cell(p, grid=GRID):
    """(row, col) = (y cell, x cell) of a LiDAR-frame point, straight from the grid's definition."""
    return (math.floor((p[1] - grid["ybound"][0]) / grid["ybound"][2]),
            math.floor((p[0] - grid["xbound"][0]) / grid["xbound"][2]))


def one_hot_lift(depth_bin: int, dbound=(1.0, 21.0, 1.0), channels: int = 2):
    """A view transform whose depthnet puts all of a 1-channel feature's mass at one depth bin."""
    from bevcache.camera import LSSViewTransform

    vt = LSSViewTransform(in_channels=1, out_channels=channels, dbound=list(dbound), **GRID)
    with torch.no_grad():
        vt.depthnet.weight.zero_()
        vt.depthnet.bias.zero_()
        vt.depthnet.bias[depth_bin] = 60.0  # softmax -> one-hot (the rest e^-60)
        vt.depthnet.weight[vt.D:, 0, 0, 0] = torch.arange(1.0, channels + 1)  # context = feature * (1, 2, ...)
    return vt


def spike(fh: int, fw: int, row: int, col: int, views: int = 1) -> torch.Tensor:
    x = torch.zeros(1, views, 1, fh, fw)
    x[0, 0, 0, row, col] = 1.0
    return x


def pixel_to_lidar(u: float, v: float, d: float, k: np.ndarray, lidar2cam: np.ndarray) -> np.ndarray:
    """Back-projection written out by hand (no matrices inverted the way the module does it)."""
    cam = np.array([(u - k[0, 2]) * d / k[0, 0], (v - k[1, 2]) * d / k[1, 1], d, 1.0])
    return (np.linalg.inv(lidar2cam) @ cam)[:3]


def hot_cells(bev: torch.Tensor, rel: float = 1e-6):
    """(row, col) cells holding (nearly) all of the map's mass."""
    mass = bev[0].abs().sum(0)
    return {tuple(rc) for rc in (mass > rel * mass.max()).nonzero().tolist()}


# ---------------------------------------------------------------------------------------------
# Geometry


def test_feature_lands_in_the_cell_of_its_3d_point():
    k, l2c = camera(20.0, position=(1.0, 0.5, 1.5))
    fh, fw, row, col, depth_bin = 8, 22, 3, 15, 7
    vt = one_hot_lift(depth_bin)
    bev = vt(spike(fh, fw, row, col), (IMG_H, IMG_W), as4x4(k), as4x4(l2c))
    assert bev.shape == (1, 2, 32, 32)
    s = IMG_W / fw  # feature pixel -> the centre of the image pixels it covers
    u, v, d = (col + 0.5) * s - 0.5, (row + 0.5) * (IMG_H / fh) - 0.5, 1.0 + depth_bin
    p = pixel_to_lidar(u, v, d, k, l2c)
    assert hot_cells(bev) == {expected_cell(p)}
    torch.testing.assert_close(bev[0, :, expected_cell(p)[0], expected_cell(p)[1]], torch.tensor([1.0, 2.0]))


def test_cell_layout_matches_the_lidar_voxeliser():
    """The camera map's cell of a 3D point is the LiDAR map's: voxel (y, x) // out_size_factor (8)."""
    from mmcv.ops import Voxelization

    vox = Voxelization(voxel_size=[0.2, 0.2, 0.2], point_cloud_range=[-25.6, -25.6, -5.0, 25.6, 25.6, 3.0],
                       max_num_points=10, max_voxels=100)
    for yaw, (row, col), depth_bin in [(0.0, (3, 15), 7), (-55.0, (5, 2), 12), (180.0, (1, 20), 3),
                                       (110.0, (6, 9), 18)]:
        k, l2c = camera(yaw, position=(0.3, -0.2, 1.6))
        vt = one_hot_lift(depth_bin)
        bev = vt(spike(8, 22, row, col), (IMG_H, IMG_W), as4x4(k), as4x4(l2c))
        s = IMG_W / 22
        p = pixel_to_lidar((col + 0.5) * s - 0.5, (row + 0.5) * IMG_H / 8 - 0.5, 1.0 + depth_bin, k, l2c)
        _, coors, _ = vox(torch.tensor([[*p, 0.0]], dtype=torch.float32))  # coors: (z, y, x)
        assert hot_cells(bev) == {(int(coors[0, 1]) // 8, int(coors[0, 2]) // 8)}, (yaw, p)


def test_image_and_lidar_augmentation_are_undone_and_applied():
    # Network input = the original 2x-larger image flipped left-right, halved and shifted
    # (BEVFusion's img_aug_matrix: original pixel -> augmented pixel); the scene is rotated 90 deg
    # about z and shifted (lidar_aug_matrix: LiDAR -> augmented LiDAR frame).
    k, l2c = camera(-30.0, position=(0.5, 0.0, 1.5), f=160.0, size=(2 * IMG_H, 2 * IMG_W))
    img_aug = np.array([[-0.5, 0, 0, IMG_W - 0.5], [0, 0.5, 0, -2.0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    lidar_aug = np.array([[0, -1, 0, 1.0], [1, 0, 0, -2.0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    fh, fw, row, col, depth_bin = 8, 22, 4, 6, 9
    vt = one_hot_lift(depth_bin)
    bev = vt(spike(fh, fw, row, col), (IMG_H, IMG_W), as4x4(k), as4x4(l2c), as4x4(img_aug), as4x4(lidar_aug)[0])
    u_aug, v_aug = (col + 0.5) * IMG_W / fw - 0.5, (row + 0.5) * IMG_H / fh - 0.5
    u, v = (u_aug - (IMG_W - 0.5)) / -0.5, (v_aug + 2.0) / 0.5  # the original image's pixel
    p = pixel_to_lidar(u, v, 1.0 + depth_bin, k, l2c)
    p_aug = np.array([-p[1] + 1.0, p[0] - 2.0, p[2]])
    assert hot_cells(bev) == {expected_cell(p_aug)}


def test_mmdet3d_augmentation_record_moves_the_frustum_like_the_points():
    """GlobalRotScaleTrans + RandomFlip3D (pcd_* keys) -> camera_matrices' lidar_aug moves a point as they did."""
    from mmdet3d.datasets.transforms import GlobalRotScaleTrans, RandomFlip3D
    from mmdet3d.structures import LiDARPoints

    from bevcache.camera import camera_matrices

    p = np.array([9.0, -1.7, 0.3, 0.0], dtype=np.float32)
    np.random.seed(3)
    results = dict(points=LiDARPoints(p[None].copy(), points_dim=4), bbox3d_fields=[])
    results = GlobalRotScaleTrans(rot_range=[-0.4, 0.4], scale_ratio_range=[0.95, 1.05],
                                  translation_std=[0.5, 0.5, 0])(results)
    results = RandomFlip3D(sync_2d=False, flip_ratio_bev_horizontal=1.0, flip_ratio_bev_vertical=1.0)(results)
    k, l2c = camera(0.0)
    meta = {key: results[key] for key in ("pcd_rotation", "pcd_rotation_angle", "pcd_scale_factor", "pcd_trans",
                                          "pcd_horizontal_flip", "pcd_vertical_flip", "transformation_3d_flow")}
    meta.update(cam2img=[k], lidar2cam=[l2c])
    lidar_aug = camera_matrices([meta], 1, dtype=torch.float64)["lidar_aug"][0].numpy()
    moved = results["points"].tensor[0, :2].double().numpy()
    np.testing.assert_allclose((lidar_aug @ np.r_[p[:3], 1.0])[:2], moved, atol=1e-4)


def test_missing_camera_matrices_are_named():
    from bevcache.camera import camera_matrices
    from bevcache.errors import ConfigError

    with pytest.raises(ConfigError, match="lidar2cam.*LoadMultiViewImageFromFiles"):
        camera_matrices([dict(cam2img=[np.eye(3)] * 6)], 6)
    with pytest.raises(ConfigError, match="5 'cam2img' matrices for 6 images"):
        camera_matrices([dict(cam2img=[np.eye(3)] * 5, lidar2cam=[np.eye(4)] * 6)], 6)


# ---------------------------------------------------------------------------------------------
# The tiny fused teacher and the camera-only student


def build(config: str, seed: int = 0):
    from mmdet3d.registry import MODELS

    from bevcache.runtime import load_config, setup_runtime

    setup_runtime()
    cfg = load_config(CONFIGS / config)
    torch.manual_seed(seed)
    return MODELS.build(copy.deepcopy(cfg.model)), cfg


def fake_batch(batch: int = 2, seed: int = 0, *, points: bool = True, with_gt: bool = True):
    """What the camera pipelines pack: points [N, 4], six uint8 BGR images [6, 3, H, W], camera matrices."""
    from mmdet3d.structures import Det3DDataSample, LiDARInstance3DBoxes
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(seed)
    inputs = dict(img=[], points=[])
    samples = []
    for b in range(batch):
        inputs["img"].append(torch.randint(0, 256, (6, 3, IMG_H, IMG_W), generator=g, dtype=torch.uint8))
        xyz = (torch.rand(3000, 3, generator=g) - 0.5) * torch.tensor([50.0, 50.0, 6.0]) + torch.tensor([0, 0, -1.0])
        inputs["points"].append(torch.cat([xyz, torch.rand(3000, 1, generator=g)], 1))
        cams = [camera(y, position=(0.5 * math.cos(math.radians(y)), 0.5 * math.sin(math.radians(y)), 1.6))
                for y in YAWS]
        sample = Det3DDataSample(metainfo=dict(
            cam2img=[c[0] for c in cams], lidar2cam=[c[1] for c in cams], sample_idx=b, token=f"tok{b}",
            box_type_3d=LiDARInstance3DBoxes, num_views=6))
        if with_gt:
            gt = InstanceData()
            gt.bboxes_3d = LiDARInstance3DBoxes(torch.tensor(
                [[5.0 + b, 3.0, -1.0, 4.0, 1.8, 1.6, 0.3, 0.0, 0.0], [-8.0, -6.0, -1.0, 0.8, 0.6, 1.7, 0.0, 0.0, 0.0]]),
                box_dim=9)
            gt.labels_3d = torch.tensor([0, 8])
            sample.gt_instances_3d = gt
        samples.append(sample)
    if not points:
        inputs.pop("points")
    return dict(inputs=inputs, data_samples=samples)


def pts_neck_of(model, data) -> torch.Tensor:
    out = {}
    handle = model.pts_neck.register_forward_hook(lambda m, i, o: out.__setitem__("x", o[0] if isinstance(o, (list, tuple)) else o))
    try:
        with torch.no_grad():
            model(**model.data_preprocessor(copy.deepcopy(data), False), mode="predict")
    finally:
        handle.remove()
    return out["x"]


def loss_backward_predict(model, data) -> dict:
    model.train()
    batch = model.data_preprocessor(copy.deepcopy(data), True)
    losses = model(**batch, mode="loss")
    total = sum(v for k, v in losses.items() if "loss" in k)
    assert torch.isfinite(total), losses
    total.backward()
    model.eval()
    with torch.no_grad():
        preds = model(**model.data_preprocessor(copy.deepcopy(data), False), mode="predict")
    assert len(preds) == len(data["data_samples"]) and all("pred_instances_3d" in p for p in preds)
    return losses


def grad_norm(module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


@pytest.fixture(scope="module")
def fused():
    return build("tiny_fused_teacher.py")[0]


def test_fused_teacher_trains_and_predicts_through_both_branches(fused):
    from bevcache.camera import LSSViewTransform
    from bevcache.fusion import ConcatConvFuser, FusedCenterPoint

    assert isinstance(fused, FusedCenterPoint) and fused.with_camera and fused.with_lidar
    assert isinstance(fused.view_transform, LSSViewTransform) and isinstance(fused.fusion_layer, ConcatConvFuser)
    # BEVFusion's module names, as bevcache extract / distill layer paths name them.
    for name in ("img_backbone", "img_neck", "view_transform", "pts_voxel_encoder", "pts_middle_encoder",
                 "fusion_layer", "pts_backbone", "pts_neck", "pts_bbox_head"):
        assert isinstance(getattr(fused, name), torch.nn.Module), name
    fused.zero_grad()
    loss_backward_predict(fused, fake_batch())
    for name in ("img_backbone", "img_neck", "view_transform", "pts_middle_encoder", "fusion_layer", "pts_neck"):
        assert grad_norm(getattr(fused, name)) > 0, f"no gradient reached {name}"


def test_fused_pts_neck_has_the_lidar_teachers_shape(fused):
    lidar, _ = build("tiny_voxel_teacher.py")
    lidar.eval()
    fused.eval()
    data = fake_batch()
    lidar_data = copy.deepcopy(data)
    lidar_data["inputs"].pop("img")
    assert pts_neck_of(fused, data).shape == pts_neck_of(lidar, lidar_data).shape == (2, 512, 32, 32)


def test_pts_neck_depends_on_the_images_and_on_the_points(fused):
    with one_intra_op_thread():  # spconv on the CPU is bit-reproducible with one thread only
        _pts_neck_depends_on_both_inputs(fused)


def _pts_neck_depends_on_both_inputs(fused) -> None:
    fused.eval()
    data = fake_batch(batch=1, seed=1)
    base = pts_neck_of(fused, data)
    other_images = copy.deepcopy(data)
    other_images["inputs"]["img"] = fake_batch(batch=1, seed=2)["inputs"]["img"]
    other_points = copy.deepcopy(data)
    other_points["inputs"]["points"] = fake_batch(batch=1, seed=2)["inputs"]["points"]
    assert torch.equal(pts_neck_of(fused, copy.deepcopy(data)), base)  # deterministic in eval
    assert (pts_neck_of(fused, other_images) - base).abs().max() > 1e-4, "the camera branch is not used"
    assert (pts_neck_of(fused, other_points) - base).abs().max() > 1e-4, "the LiDAR branch is not used"


def test_the_cpu_lift_stays_small(fused):
    """The tiny config's lift is CPU-sized (what a full-size lift would cost, ~2M frustum points x 80
    channels per sample, must not slip in); its seconds are measured in benchmarks/bench_fused.py."""
    lift = fused.view_transform
    cameras, (f_h, f_w) = 6, (IMG_H // 8, IMG_W // 8)  # the FPN level the lift reads: stride 8
    frustum = lift.frustum((f_h, f_w), (IMG_H, IMG_W))
    assert frustum.shape == (lift.D, f_h, f_w, 3)
    points = cameras * frustum[..., 0].numel()
    assert points * lift.C <= 2_000_000, (points, lift.C)  # ~8 MB of float32 frustum features
    assert (lift.nx, lift.ny, lift.nz) == (32, 32, 1)  # the LiDAR BEV grid, one z cell


def test_camera_only_student_runs_without_points():
    from bevcache.fusion import FusedCenterPoint

    student, cfg = build("tiny_camera_student.py")
    assert isinstance(student, FusedCenterPoint) and student.with_camera and not student.with_lidar
    assert not hasattr(student, "pts_middle_encoder") and student.fusion_layer is None
    data = fake_batch(points=False)
    loss_backward_predict(student, data)
    assert grad_norm(student.img_backbone) > 0 and grad_norm(student.view_transform) > 0
    out = pts_neck_of(student, data)
    assert out.shape == (2, 256, 32, 32)  # the voxel student's pts_neck
    other = copy.deepcopy(data)
    other["inputs"]["img"] = fake_batch(seed=5, points=False)["inputs"]["img"]
    assert (pts_neck_of(student, other) - out).abs().max() > 1e-4
    # Its pipelines never load points.
    for key in ("train_dataloader", "test_dataloader"):
        kinds = [step["type"] for step in cfg[key].dataset.pipeline]
        assert "LoadMultiViewImageFromFiles" in kinds and not any("Points" in k for k in kinds), kinds


def test_misconfigured_branches_are_refused():
    from mmdet3d.registry import MODELS

    from bevcache.errors import ConfigError

    _, cfg = build("tiny_fused_teacher.py")
    no_fuser = copy.deepcopy(cfg.model)
    no_fuser.fusion_layer = None
    with pytest.raises(ConfigError, match="fusion_layer is needed exactly when both"):
        MODELS.build(no_fuser)
    half_camera = copy.deepcopy(cfg.model)
    half_camera.view_transform = None
    with pytest.raises(ConfigError, match="img_backbone and view_transform come together"):
        MODELS.build(half_camera)


@pytest.mark.parametrize("config", ["tiny_fused_teacher.py", "tiny_camera_student.py"])
def test_test_pipeline_feeds_the_model(config, tmp_path):
    """The config's own test pipeline on hand-written files (what NuScenesDataset hands it: v2 info
    with images[CAM_*]) -> data preprocessor -> predict; the camera matrices reach the metainfo."""
    import cv2
    from mmdet3d.registry import TRANSFORMS
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmengine.dataset import Compose, pseudo_collate

    model, cfg = build(config)
    g = np.random.default_rng(0)
    points = np.concatenate([(g.random((2000, 3)) - 0.5) * [50, 50, 6], g.random((2000, 2))], 1).astype(np.float32)
    points.tofile(tmp_path / "lidar.bin")
    images = {}
    for name, yaw in zip(CAMERAS, YAWS, strict=True):
        k, l2c = camera(yaw)
        cv2.imwrite(str(tmp_path / f"{name}.jpg"), g.integers(0, 256, (IMG_H, IMG_W, 3), dtype=np.uint8))
        images[name] = dict(img_path=str(tmp_path / f"{name}.jpg"), cam2img=k.tolist(), lidar2cam=l2c.tolist())
    info = dict(lidar_points=dict(lidar_path=str(tmp_path / "lidar.bin"), num_pts_feats=5), images=images,
                sample_idx=7, token="abc", box_type_3d=LiDARInstance3DBoxes)  # + what the dataset adds
    pipeline = Compose([TRANSFORMS.build(step) for step in cfg.test_dataloader.dataset.pipeline])
    data = pseudo_collate([pipeline(copy.deepcopy(info))])
    meta = data["data_samples"][0].metainfo
    assert meta["sample_idx"] == 7 and meta["token"] == "abc" and len(meta["lidar2cam"]) == 6
    np.testing.assert_allclose(meta["cam2img"][1], images[CAMERAS[1]]["cam2img"])
    assert data["inputs"]["img"][0].shape == (6, 3, IMG_H, IMG_W)
    model.eval()
    with torch.no_grad():
        batch = model.data_preprocessor(data, False)
        imgs = batch["inputs"]["imgs"]
        assert imgs.shape == (1, 6, 3, IMG_H, IMG_W) and imgs.dtype == torch.float32 and imgs.abs().mean() < 3
        preds = model(**batch, mode="predict")
    assert "pred_instances_3d" in preds[0]
