"""warp.py: recorded augmentation -> BEV affine -> warped teacher map, checked against mmdet3d itself."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache.warp import (
    BEV_EFFECT,
    WarpError,
    bev_transform,
    gaussian_foreground,
    non_warpable,
    warp_bev,
)

RANGE = (-10.0, -8.0, 10.0, 8.0)  # (xmin, ymin, xmax, ymax): 0.25 m cells on a [64, 80] map
H, W = 64, 80


def _rot(deg: float) -> np.ndarray:
    """Column-vector 3x3 of a counter-clockwise yaw rotation (mmdet3d's positive angle)."""
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _scale(k: float) -> np.ndarray:
    return np.diag([k, k, 1.0])


def _trans(tx: float, ty: float) -> np.ndarray:
    return np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]])


HFLIP, VFLIP = np.diag([1, -1, 1.0]), np.diag([-1, 1, 1.0])


def _centres(grid_range=RANGE, h=H, w=W) -> tuple[np.ndarray, np.ndarray]:
    """Metric (x, y) of every cell centre, each [h, w]; row index grows with y."""
    xmin, ymin, xmax, ymax = grid_range
    xs = xmin + (np.arange(w) + 0.5) * (xmax - xmin) / w
    ys = ymin + (np.arange(h) + 0.5) * (ymax - ymin) / h
    return np.meshgrid(xs, ys, indexing="xy")


def _f(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth, asymmetric pattern: no flip or rotation maps it onto itself."""
    return np.sin(0.3 * x + 0.1 * y) + np.cos(0.2 * y - 0.05 * x) + 0.01 * x * y + 0.02 * x


def _pattern_map() -> torch.Tensor:
    x, y = _centres()
    return torch.tensor(np.stack([_f(x, y), 2 * _f(-y, x)]), dtype=torch.float32)[None]  # [1, 2, H, W]


# --- flips: exact index permutations -------------------------------------------------------


@pytest.mark.parametrize(
    "meta, dims",
    [
        ({"transformation_3d_flow": ["HF"], "pcd_horizontal_flip": True, "pcd_vertical_flip": False}, [2]),
        ({"transformation_3d_flow": ["VF"], "pcd_horizontal_flip": False, "pcd_vertical_flip": True}, [3]),
        ({"transformation_3d_flow": ["HF", "VF"], "pcd_horizontal_flip": True, "pcd_vertical_flip": True}, [2, 3]),
        ({"lidar_aug_matrix": np.diag([1.0, -1, 1, 1])}, [2]),  # BEVFusionRandomFlip3D, horizontal
        ({"lidar_aug_matrix": np.diag([-1.0, 1, 1, 1])}, [3]),  # vertical
    ],
)
def test_flips_are_exact_index_permutations(meta, dims):
    # horizontal flip negates y = the row axis (H); vertical negates x = the column axis (W)
    maps = torch.arange(3 * 2 * H * W, dtype=torch.float32).view(3, 2, H, W) * 1.37 + 0.11
    transforms = torch.tensor(np.stack([bev_transform(meta)] * 3))
    warped, valid = warp_bev(maps, transforms, RANGE)
    assert torch.equal(warped, torch.flip(maps, dims))
    assert valid.shape == (3, 1, H, W) and bool((valid == 1).all())


def test_flip_of_a_one_sided_grid_leaves_the_map():
    # a KITTI-like grid x in [0, 40): x -> -x has no source on the map
    maps = torch.rand(1, 2, 16, 20)
    warped, valid = warp_bev(maps, torch.tensor(VFLIP)[None], (0.0, -8.0, 40.0, 8.0))
    assert not valid.any() and not warped.any()
    warped, valid = warp_bev(maps, torch.tensor(HFLIP)[None], (0.0, -8.0, 40.0, 8.0))
    assert torch.equal(warped, maps.flip(2)) and valid.all()


def test_whole_cell_shift_is_exact_and_masks_the_uncovered_band():
    maps = torch.rand(1, 3, H, W)
    warped, valid = warp_bev(maps, torch.tensor(_trans(0.5, -0.25))[None], RANGE)  # +2 columns, -1 row
    assert torch.equal(warped[..., :-1, 2:], maps[..., 1:, :-2])
    assert not valid[..., :, :2].any() and not valid[..., -1, :].any() and valid[..., :-1, 2:].all()


# --- rotation/scale/translation: warp equals the analytic pattern at the source points ------

CASES = {
    "rot+5": _rot(5),
    "rot-5": _rot(-5),
    "rot+22.5": _rot(22.5),
    "rot-22.5": _rot(-22.5),
    "scale0.95": _scale(0.95),
    "scale1.05": _scale(1.05),
    "trans": _trans(1.3, -0.7),
    "RST": _trans(0.8, 0.4) @ _scale(1.04) @ _rot(-17),
    "RST+HF+VF": VFLIP @ HFLIP @ _trans(-0.3, 1.1) @ _scale(0.96) @ _rot(31),
}


@pytest.mark.parametrize("name", list(CASES))
def test_warp_equals_pattern_at_analytic_source_points(name):
    a = CASES[name]
    warped, valid = warp_bev(_pattern_map(), torch.tensor(a)[None], RANGE)
    x, y = _centres()
    src = np.linalg.inv(a) @ np.stack([x.ravel(), y.ravel(), np.ones(x.size)])  # [3, H*W]
    sx, sy = src[0].reshape(H, W), src[1].reshape(H, W)
    xmin, ymin, xmax, ymax = RANGE
    inside = (sx >= xmin) & (sx <= xmax) & (sy >= ymin) & (sy <= ymax)
    assert 0 < inside.sum() < H * W or name.startswith("scale1")  # the rim really leaves the map
    assert np.array_equal(valid[0, 0].numpy() == 1, inside)
    # Inside the extent, the value is the pattern at the source point; within half a cell of the
    # edge the edge cell's value is used, i.e. the source clamped to the outermost centres.
    cx, cy = _centres()
    sx_c = np.clip(sx, cx.min(), cx.max())
    sy_c = np.clip(sy, cy.min(), cy.max())
    expected = np.stack([_f(sx_c, sy_c), 2 * _f(-sy_c, sx_c)])  # [2, H, W]
    got = warped[0].double().numpy()
    assert np.abs(got - expected)[:, inside].max() < 4e-3  # bilinear error, 0.25 m cells
    assert not got[:, ~inside].any()


def test_warp_batches_mixed_samples_independently():
    maps = _pattern_map().repeat(3, 1, 1, 1)
    transforms = torch.tensor(np.stack([np.eye(3), _rot(22.5), HFLIP]))
    warped, valid = warp_bev(maps, transforms, RANGE)
    assert torch.equal(warped[0], maps[0]) and torch.equal(warped[2], maps[2].flip(1))
    single, single_valid = warp_bev(maps[1:2], transforms[1:2], RANGE)
    assert torch.equal(warped[1:2], single) and torch.equal(valid[1:2], single_valid)


# --- bev_transform against mmdet3d's own transforms ----------------------------------------


def _scene(seed: int):
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmdet3d.structures.points import LiDARPoints

    g = np.random.default_rng(seed)
    points = np.concatenate([g.uniform(-15, 15, (500, 2)), g.uniform(-2, 2, (500, 1)), g.random((500, 1))], 1)
    # centres on cell centres of the 0.5 m grid below, so the drawn peak is exactly at the centre
    boxes = np.array([[-5.75, 3.75, -1, 4.2, 1.9, 1.6, 0.3, 0, 0], [4.25, -2.75, -1, 2.0, 0.8, 1.7, -1.0, 0, 0],
                      [7.25, 4.75, -1, 4.6, 2.0, 1.5, 2.0, 0, 0], [-2.75, -4.75, -1, 0.7, 0.7, 1.8, 0.0, 0, 0]])
    return {
        "points": LiDARPoints(points.astype(np.float32), points_dim=4),
        "gt_bboxes_3d": LiDARInstance3DBoxes(boxes.astype(np.float32), box_dim=9),
        "gt_labels_3d": np.zeros(len(boxes), dtype=np.int64),
    }


def _augment(results: dict, seed: int, *, bevfusion_rts: bool = False) -> dict:
    """mmdet3d's GlobalRotScaleTrans + RandomFlip3D, built from TRANSFORMS, seeded."""
    from mmdet3d.registry import TRANSFORMS
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    rst = TRANSFORMS.build(dict(type="GlobalRotScaleTrans", rot_range=[-0.785, 0.785],
                                scale_ratio_range=[0.9, 1.1], translation_std=[0.5, 0.5, 0.2]))
    flip = TRANSFORMS.build(dict(type="RandomFlip3D", flip_ratio_bev_horizontal=0.5,
                                 flip_ratio_bev_vertical=0.5))
    np.random.seed(seed)
    return flip(rst(results))


def test_bev_transform_maps_original_points_onto_mmdet3d_augmented_points():
    seen = set()
    for seed in range(40):
        original = _scene(seed)
        xy = original["points"].tensor[:, :2].double().numpy().copy()
        out = _augment(original, seed)
        a = bev_transform(out)
        mapped = (a @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
        np.testing.assert_allclose(mapped, out["points"].tensor[:, :2].double().numpy(), atol=1e-4)
        seen.add((bool(out["pcd_horizontal_flip"]), bool(out["pcd_vertical_flip"])))
        if len(seen) == 4 and seed >= 7:
            break
    assert len(seen) == 4  # every flip combination was exercised


def test_rotation_angle_alone_gives_the_same_transform():
    out = _augment(_scene(3), 3)
    without_matrix = {k: v for k, v in out.items() if k != "pcd_rotation"}
    np.testing.assert_allclose(bev_transform(without_matrix), bev_transform(out), atol=1e-6)


@pytest.mark.parametrize("seed", [0, 5, 11])
def test_foreground_follows_the_boxes_through_real_augmentation(seed):
    grid, size = (-20.0, -20.0, 20.0, 20.0), (80, 80)  # 0.5 m cells
    scene = _scene(seed)
    fg_src = gaussian_foreground(scene["gt_bboxes_3d"].clone(), grid, size)
    out = _augment(scene, seed)
    a = torch.tensor(bev_transform(out))
    warped, valid = warp_bev(fg_src[None, None], a[None], grid)
    fg_aug = gaussian_foreground(out["gt_bboxes_3d"], grid, size)
    assert valid[0, 0, 20:60, 20:60].all()  # boxes stay well inside
    cells = ((out["gt_bboxes_3d"].tensor[:, :2] + 20) / 0.5).floor().long()  # [N, 2] (col, row)
    moved = 0
    for col, row in cells.tolist():
        assert fg_aug[row, col] == 1  # CenterHead-style peak at the augmented centre's cell
        window = warped[0, 0, row - 3:row + 4, col - 3:col + 4]
        peak_row, peak_col = divmod(int(window.argmax()), 7)
        assert max(abs(peak_row - 3), abs(peak_col - 3)) <= 1  # the warped peak lands there (+-1 cell)
        assert warped[0, 0, row, col] > 0.5  # the true centre is within half a cell of that cell's centre
        moved += int(fg_src[row, col] < 0.5)  # without the warp, nothing would be there
    assert moved >= 2
    overlap = (torch.minimum(warped[0, 0], fg_aug).sum() / torch.maximum(warped[0, 0], fg_aug).sum())
    assert overlap > 0.6


# --- BEVFusion's lidar_aug_matrix ----------------------------------------------------------


def _bevfusion_matrix(meta: dict, flip_h: bool, flip_v: bool) -> np.ndarray:
    """The 4x4 BEVFusion records: rotation, translation, then scale (RTS), then its flips."""
    rot_t = np.asarray(meta["pcd_rotation"], dtype=np.float64)
    s, t = float(meta["pcd_scale_factor"]), np.asarray(meta["pcd_trans"], dtype=np.float64)
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = rot_t.T * s, t * s  # p' = s (R p + t)
    flips = np.diag([-1.0 if flip_v else 1.0, -1.0 if flip_h else 1.0, 1, 1])
    return flips @ m


@pytest.mark.parametrize("flip_h, flip_v", [(False, False), (True, False), (False, True), (True, True)])
def test_bevfusion_matrix_warps_like_the_equivalent_mmdet3d_keys(flip_h, flip_v):
    rng = np.random.default_rng(int(flip_h) * 2 + int(flip_v))
    angle = rng.uniform(-0.785, 0.785)
    c, s = math.cos(angle), math.sin(angle)
    flow = ["R", "T", "S"] + (["HF"] if flip_h else []) + (["VF"] if flip_v else [])
    keys = {
        "pcd_rotation": torch.tensor([[c, s, 0], [-s, c, 0], [0, 0, 1]]),  # mmdet3d's rot_mat_T
        "pcd_rotation_angle": angle, "pcd_scale_factor": rng.uniform(0.9, 1.1),
        "pcd_trans": rng.normal(scale=0.5, size=3), "transformation_3d_flow": flow,
        "pcd_horizontal_flip": flip_h, "pcd_vertical_flip": flip_v,
    }
    matrix = {"lidar_aug_matrix": _bevfusion_matrix(keys, flip_h, flip_v)}
    # BEVFusionGlobalRotScaleTrans records both forms, BEVFusionRandomFlip3D only the matrix
    both = {**{k: v for k, v in keys.items() if "flip" not in k}, "transformation_3d_flow": ["R", "T", "S"],
            **matrix}
    a_keys, a_matrix, a_both = bev_transform(keys), bev_transform(matrix), bev_transform(both)
    np.testing.assert_allclose(a_matrix, a_keys, atol=1e-6)
    np.testing.assert_allclose(a_both, a_keys, atol=1e-6)
    maps = _pattern_map()
    w_keys, v_keys = warp_bev(maps, torch.tensor(a_keys)[None], RANGE)
    w_matrix, v_matrix = warp_bev(maps, torch.tensor(a_matrix)[None], RANGE)
    assert torch.equal(v_keys, v_matrix)
    torch.testing.assert_close(w_keys, w_matrix, atol=1e-5, rtol=0)


BEVFUSION_TRANSFORMS = Path(os.environ.get("MMDET3D_ROOT", "/work/mmdetection3d")) / \
    "projects/BEVFusion/bevfusion/transforms_3d.py"


@pytest.mark.skipif(not BEVFUSION_TRANSFORMS.is_file(), reason="needs an mmdetection3d checkout (MMDET3D_ROOT)")
def test_real_bevfusion_transforms_match_their_points(monkeypatch):
    from mmdet3d.registry import TRANSFORMS
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    # Load the module file alone (the project's package __init__ imports CUDA-only ops), without
    # registering its classes: a later import of the real project must still register them.
    monkeypatch.setattr(TRANSFORMS, "register_module", lambda *args, **kwargs: (lambda cls: cls))
    spec = importlib.util.spec_from_file_location("bevfusion_transforms_3d_under_test", BEVFUSION_TRANSFORMS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rst = module.BEVFusionGlobalRotScaleTrans(rot_range=[-0.785, 0.785], scale_ratio_range=[0.9, 1.1],
                                              translation_std=[0.5, 0.5, 0.2])
    flip = module.BEVFusionRandomFlip3D()
    for seed in range(6):
        scene = _scene(seed)
        xy = scene["points"].tensor[:, :2].double().numpy().copy()
        np.random.seed(seed)
        out = flip(rst(scene))
        a = bev_transform(out)  # both forms present: the matrix holds the flips
        mapped = (a @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
        np.testing.assert_allclose(mapped, out["points"].tensor[:, :2].double().numpy(), atol=1e-4)


def _matrix_only_flip(results: dict, seed: int) -> dict:
    """What BEVFusionRandomFlip3D does (its definition, not its code): flip points and boxes, compose
    the flip into lidar_aug_matrix only, record nothing in pcd_* or transformation_3d_flow."""
    rng = np.random.default_rng(seed)
    flip_h, flip_v = bool(rng.integers(2)), bool(rng.integers(2))
    flip = np.eye(3)
    for on, direction, diag in ((flip_h, "horizontal", [1, -1, 1]), (flip_v, "vertical", [-1, 1, 1])):
        if on:
            results["points"].flip(direction)
            results["gt_bboxes_3d"].flip(direction)
            flip = np.diag(diag).astype(np.float64) @ flip
    m = results.get("lidar_aug_matrix", np.eye(4))
    m[:3, :] = flip @ m[:3, :]
    results["lidar_aug_matrix"] = m
    results["flips_under_test"] = (flip_h, flip_v)
    return results


def test_mmdet3d_rotation_then_a_matrix_only_flip_compose_in_pipeline_order():
    """The stock BEVFusion-L mix: mmdet3d's GlobalRotScaleTrans (pcd_* keys) then BEVFusion's flip
    (lidar_aug_matrix only). With the pipeline's order the warp maps original points onto augmented ones."""
    from mmdet3d.registry import TRANSFORMS
    from mmdet3d.utils import register_all_modules

    from bevcache.warp import augmentation_order

    register_all_modules()
    rst = TRANSFORMS.build(dict(type="GlobalRotScaleTrans", rot_range=[-0.785, 0.785],
                                scale_ratio_range=[0.9, 1.1], translation_std=[0.5, 0.5, 0.2]))
    order = augmentation_order(["LoadPointsFromFile", "GlobalRotScaleTrans", "BEVFusionRandomFlip3D",
                                "PointsRangeFilter", "Pack3DDetInputs"])
    assert order == ("GlobalRotScaleTrans", "BEVFusionRandomFlip3D")
    seen = set()
    for seed in range(12):
        scene = _scene(seed)
        xy = scene["points"].tensor[:, :2].double().numpy().copy()
        np.random.seed(seed)
        out = _matrix_only_flip(rst(scene), seed)
        with pytest.raises(WarpError, match="order"):  # the record alone cannot say which came first
            bev_transform(out)
        a = bev_transform(out, order)
        mapped = (a @ np.c_[xy, np.ones(len(xy))].T).T[:, :2]
        np.testing.assert_allclose(mapped, out["points"].tensor[:, :2].double().numpy(), atol=1e-4)
        seen.add(out["flips_under_test"])
    assert len(seen) == 4


def test_augmentation_orders_that_cannot_be_composed_are_refused():
    from bevcache.warp import augmentation_order

    with pytest.raises(WarpError, match="record only lidar_aug_matrix"):
        augmentation_order(["BEVFusionRandomFlip3D", "GlobalRotScaleTrans", "BEVFusionRandomFlip3D"])
    with pytest.raises(WarpError, match="repeats"):
        augmentation_order(["GlobalRotScaleTrans", "BEVFusionGlobalRotScaleTrans"])


# --- refusals and the transform table ------------------------------------------------------


def test_no_augmentation_is_identity():
    assert np.array_equal(bev_transform({}), np.eye(3))
    assert np.array_equal(bev_transform({"transformation_3d_flow": [], "pcd_horizontal_flip": False}), np.eye(3))


@pytest.mark.parametrize(
    "meta, words",
    [
        ({"transformation_3d_flow": ["R", "S", "T", "R", "S", "T"], "pcd_rotation": np.eye(3),
          "pcd_scale_factor": 1.0, "pcd_trans": np.zeros(3)}, "repeats"),
        ({"pcd_scale_factor": 1.02}, "order is unknown"),
        ({"transformation_3d_flow": ["R"]}, "pcd_rotation"),
        ({"transformation_3d_flow": ["R"], "pcd_rotation": np.array([[1, 0, 0], [0, 0.8, 0.6], [0, -0.6, 0.8]])},
         "about z"),
        ({"transformation_3d_flow": ["HF"], "pcd_horizontal_flip": False}, "disagrees"),
        ({"transformation_3d_flow": ["HF"], "pcd_horizontal_flip": True, "lidar_aug_matrix": np.eye(4)},
         "mixes"),
        ({"transformation_3d_flow": ["X"]}, "not BEV warps"),
    ],
)
def test_unusable_records_are_refused(meta, words):
    with pytest.raises(WarpError, match=words):
        bev_transform(meta)


def test_non_warpable_names_what_a_warp_cannot_express():
    pipeline = [
        dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
        dict(type="LoadPointsFromMultiSweeps", sweeps_num=9, test_mode=True),
        "ObjectSample",
        dict(type="mmdet3d.ObjectNoise"),
        dict(type="GlobalRotScaleTrans"),
        dict(type="RandomFlip3D"),
        dict(type="MultiScaleFlipAug3D", transforms=[dict(type="PointSample", num_points=100)]),
        dict(type="PointShuffle"),
        dict(type="ObjectSample"),
    ]
    found = non_warpable(pipeline)
    assert list(found) == ["ObjectSample", "ObjectNoise", "PointSample"]
    assert all(found.values())  # each with a reason
    assert "LoadPointsFromMultiSweeps" in non_warpable([dict(type="LoadPointsFromMultiSweeps", sweeps_num=9)])
    assert BEV_EFFECT["PointShuffle"][0] and not BEV_EFFECT["ObjectSample"][0]


# --- gaussian_foreground against mmdet3d's CenterHead targets ------------------------------


def test_gaussian_foreground_equals_centerhead_heatmap_targets():
    from mmdet3d.registry import MODELS
    from mmdet3d.structures import LiDARInstance3DBoxes
    from mmdet3d.utils import register_all_modules
    from mmengine.structures import InstanceData

    register_all_modules()
    pc_range, voxel, osf = [-20.0, -16.0, -5.0, 20.0, 16.0, 3.0], [0.25, 0.25, 8.0], 2  # map [64, 80]
    head = MODELS.build(dict(
        type="CenterHead", in_channels=8, tasks=[dict(num_class=2, class_names=["car", "pedestrian"])],
        common_heads=dict(reg=(2, 2), height=(1, 2), dim=(3, 2), rot=(2, 2), vel=(2, 2)),
        share_conv_channel=8,
        bbox_coder=dict(type="CenterPointBBoxCoder", post_center_range=[-25, -25, -10, 25, 25, 10],
                        max_num=100, score_threshold=0.1, out_size_factor=osf, voxel_size=voxel[:2],
                        pc_range=pc_range[:2], code_size=9),
        separate_head=dict(type="SeparateHead", init_bias=-2.19, final_kernel=3),
        train_cfg=dict(grid_size=[160, 128, 1], voxel_size=voxel, out_size_factor=osf, dense_reg=1,
                       gaussian_overlap=0.1, max_objs=50, min_radius=2, code_weights=[1.0] * 10,
                       point_cloud_range=pc_range),
    ))
    boxes = LiDARInstance3DBoxes(torch.tensor([
        [-6.0, 3.5, -1, 4.2, 1.9, 1.6, 0.3, 0, 0], [4.1, -3.2, -1, 9.0, 2.8, 3.0, -1.0, 0, 0],
        [-5.2, 2.9, -1, 4.6, 2.0, 1.5, 2.0, 0, 0], [12.3, -9.7, -1, 0.7, 0.7, 1.8, 0.0, 0, 0],
        [30.0, 0.0, -1, 4.0, 2.0, 1.5, 0.0, 0, 0],  # outside the grid: skipped by both
    ]), box_dim=9)
    heatmaps = head.get_targets_single(InstanceData(bboxes_3d=boxes, labels_3d=torch.tensor([0, 0, 0, 1, 0])))[0]
    expected = heatmaps[0].amax(0)  # [64, 80]: one task, max over its classes
    got = gaussian_foreground(boxes, (-20.0, -16.0, 20.0, 16.0), (64, 80), min_radius=2, overlap=0.1)
    assert got.shape == (64, 80) and expected.max() == 1
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    bev = torch.cat([boxes.tensor[:, :2], boxes.tensor[:, 3:5], boxes.tensor[:, 6:7]], 1)  # [N, 5]
    torch.testing.assert_close(gaussian_foreground(bev, (-20.0, -16.0, 20.0, 16.0), (64, 80)), expected,
                               atol=0, rtol=0)
