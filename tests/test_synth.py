"""bevcache.synth: deterministic, fixture-faithful, geometrically honest synthetic nuScenes data."""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache import synth
from bevcache.errors import ConfigError

FIXTURE = Path(__file__).resolve().parent / "data" / "nuscenes-fixture"  # a copy of ../shared/data/nuscenes-fixture
PIPELINE = [
    dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
    dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
    dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"]),
]
DATA_PREFIX = dict(pts="samples/LIDAR_TOP", img="", sweeps="sweeps/LIDAR_TOP")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth.generate(out, num_train=16, num_val=8, seed=0)


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_sweeps")
    return out, synth.generate(out, num_train=3, num_val=2, seed=3, sweeps=2)


def _infos(out: Path, split: str) -> list[dict]:
    with open(out / f"nuscenes_infos_{split}.pkl", "rb") as f:
        return pickle.load(f)["data_list"]


def _points(out: Path, info: dict) -> np.ndarray:
    return np.fromfile(
        out / "samples" / "LIDAR_TOP" / info["lidar_points"]["lidar_path"], dtype=np.float32
    ).reshape(-1, 5)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _signature(obj):
    """Structure and leaf types of a nested info value (lists summarised by the set of element signatures)."""
    if isinstance(obj, dict):
        return {k: _signature(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return ("list", frozenset(repr(_signature(v)) for v in obj))
    return type(obj).__name__


def _nuscenes_dataset(root: Path, ann_file: str, pipeline=PIPELINE, data_prefix=DATA_PREFIX, **kwargs):
    from mmdet3d.datasets import NuScenesDataset
    from mmdet3d.utils import register_all_modules

    register_all_modules()
    return NuScenesDataset(
        data_root=str(root),
        ann_file=ann_file,
        data_prefix=data_prefix,
        pipeline=pipeline,
        metainfo=dict(version="v1.0-mini"),
        **kwargs,
    )


def test_scene_names_are_the_devkit_splits():
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    assert list(synth.TRAIN_SCENE_NAMES) == splits["mini_train"]
    assert list(synth.VAL_SCENE_NAMES) == splits["mini_val"]
    # with both table versions a scene must be in the same split of each
    assert set(synth.BOTH_TRAIN_SCENE_NAMES) == set(splits["mini_train"]) & set(splits["train"])
    assert set(synth.VAL_SCENE_NAMES) <= set(splits["val"])


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path, sweep_data):
    out, _ = sweep_data
    again = synth.generate(tmp_path / "again", num_train=3, num_val=2, seed=3, sweeps=2)
    first = _tree_digest(out)
    assert len([p for p in first if p.endswith(".pcd.bin")]) == (3 + 2) * 3
    assert _tree_digest(tmp_path / "again") == first
    assert again["points_per_sample_mean"] == sweep_data[1]["points_per_sample_mean"]

    synth.generate(tmp_path / "other", num_train=3, num_val=2, seed=4, sweeps=2)
    a, b = _infos(out, "train")[0], _infos(tmp_path / "other", "train")[0]
    assert a["token"] != b["token"]
    assert [i["bbox_3d"] for i in a["instances"]] != [i["bbox_3d"] for i in b["instances"]]
    assert set(first.values()).isdisjoint(
        h for p, h in _tree_digest(tmp_path / "other").items() if p.endswith(".pcd.bin")
    )


def test_summary_and_point_density(data):
    out, summary = data
    assert summary["num_train"] == 16 and summary["num_val"] == 8
    assert summary["num_train_scenes"] == 8 and summary["num_val_scenes"] == 2
    assert len(_infos(out, "train")) == 16 and len(_infos(out, "val")) == 8
    assert 10_000 <= summary["points_per_sample_mean"] <= 30_000
    assert summary["num_boxes"] == sum(
        int(i["num_lidar_pts"]) > 0
        for s in ("train", "val")
        for info in _infos(out, s)
        for i in info["instances"]
    )
    with open(out / "nuscenes_infos_val.pkl", "rb") as f:
        meta = pickle.load(f)["metainfo"]
    assert meta == {
        "categories": {c: i for i, c in enumerate(synth.CLASSES)},
        "dataset": "nuscenes",
        "version": "v1.0-mini",
        "info_version": "1.1",
    }


def test_info_keys_and_types_match_the_real_fixture(data, sweep_data):
    with open(FIXTURE / "nus_info.pkl", "rb") as f:
        real = pickle.load(f)["data_list"]
    real_keys = set().union(*(info.keys() for info in real))
    real_instance = {repr(_signature(i)) for info in real for i in info["instances"]}
    real_sweep = next(info["lidar_sweeps"][0] for info in real if info.get("lidar_sweeps"))
    for out, _ in (data, sweep_data):
        for info in _infos(out, "train") + _infos(out, "val"):
            assert set(info) == real_keys
            for key in ("token", "timestamp", "ego2global", "sample_idx", "lidar_points"):
                assert _signature(info[key]) == _signature(real[0][key]), key
            assert type(info["images"]) is dict and info["images"] == {}
            assert {repr(_signature(i)) for i in info["instances"]} == real_instance
            assert all(
                isinstance(v, float)
                for i in info["instances"]
                for v in i["bbox_3d"] + i["velocity"]
            )
            for sweep in info["lidar_sweeps"]:
                assert set(sweep) == set(real_sweep)
                assert {"lidar_path", "lidar2ego", "lidar2sensor", "num_pts_feats"} <= set(
                    sweep["lidar_points"]
                )
                assert _signature(sweep["lidar_points"]["lidar2sensor"]) == _signature(
                    real[0]["ego2global"]
                )
    assert all(len(info["lidar_sweeps"]) == 2 for info in _infos(sweep_data[0], "train"))


@pytest.mark.parametrize("source", ["fixture", "synthetic"])
def test_loads_through_nuscenes_dataset(source, data):
    root, ann = (
        (FIXTURE, "nus_info.pkl") if source == "fixture" else (data[0], "nuscenes_infos_train.pkl")
    )
    ds = _nuscenes_dataset(root, ann)
    assert len(ds) > 0
    item = ds[0]
    points = item["inputs"]["points"]
    assert points.ndim == 2 and points.shape[1] == 5 and len(points) > 0
    gt = item["data_samples"].gt_instances_3d
    assert len(gt.bboxes_3d) == len(gt.labels_3d) > 0
    if source == "synthetic":
        raw = next(
            i for i in _infos(root, "train") if i["sample_idx"] == item["data_samples"].sample_idx
        )
        assert len(points) == len(_points(root, raw))
        assert len(gt.bboxes_3d) == sum(int(i["num_lidar_pts"]) > 0 for i in raw["instances"])
        # gravity-centre infos become bottom-centre boxes standing on the ground plane
        assert torch.allclose(
            gt.bboxes_3d.bottom_height, torch.full((len(gt.bboxes_3d),), synth.GROUND_Z), atol=1e-4
        )


def test_sweeps_load_through_multisweep_loader(sweep_data):
    out, _ = sweep_data
    pipeline = [
        dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
        dict(type="LoadPointsFromMultiSweeps", sweeps_num=2, load_dim=5, use_dim=[0, 1, 2, 3, 4]),
        dict(type="Pack3DDetInputs", keys=["points"]),
    ]
    ds = _nuscenes_dataset(out, "nuscenes_infos_val.pkl", pipeline=pipeline, test_mode=True)
    info = _infos(out, "val")[0]
    n_sweep = sum(
        len(np.fromfile(out / s["lidar_points"]["lidar_path"], dtype=np.float32)) // 5
        for s in info["lidar_sweeps"]
    )
    assert len(ds[0]["inputs"]["points"]) == len(_points(out, info)) + n_sweep


def test_points_lie_on_the_ground_or_in_boxes(data):
    out, _ = data
    for info in _infos(out, "val"):
        pts = _points(out, info)
        boxes = np.array([i["bbox_3d"] for i in info["instances"]])
        boxes[:, 3:6] += 0.2  # every face pushed out by 10 cm
        inside = (synth._box_margin(pts[:, :3].astype(np.float64), boxes) > 0).any(axis=1)
        on_ground = np.abs(pts[:, 2] - synth.GROUND_Z) < 0.05
        assert (inside | on_ground).mean() >= 0.99
        assert 0.05 < inside.mean() < 0.8  # objects are seen, and do not fill the scan
        assert set(np.unique(pts[:, 4]).astype(int)) <= set(range(32))


def test_num_lidar_pts_equals_points_in_boxes(data):
    from mmcv.ops import points_in_boxes_cpu
    from mmdet3d.structures import LiDARInstance3DBoxes

    out, _ = data
    for split in ("train", "val"):
        for info in _infos(out, split):
            pts = torch.from_numpy(_points(out, info)[:, :3])
            boxes = LiDARInstance3DBoxes(
                torch.tensor([i["bbox_3d"] for i in info["instances"]]), origin=(0.5, 0.5, 0.5)
            )
            # the op LiDARInstance3DBoxes.points_in_boxes_all uses on CUDA; takes bottom-centre boxes
            counts = points_in_boxes_cpu(pts[None], boxes.tensor[None]).sum(dim=1)[0]
            assert counts.tolist() == [int(i["num_lidar_pts"]) for i in info["instances"]]
            assert [i["bbox_3d_isvalid"] for i in info["instances"]] == [int(c) > 0 for c in counts]


def test_boxes_do_not_overlap_and_every_class_is_seen(data):
    from mmdet3d.structures import LiDARInstance3DBoxes

    out, _ = data
    for split in ("train", "val"):
        seen = set()
        for info in _infos(out, split):
            boxes = LiDARInstance3DBoxes(
                torch.tensor([i["bbox_3d"] for i in info["instances"]]), origin=(0.5, 0.5, 0.5)
            )
            iou = LiDARInstance3DBoxes.overlaps(boxes, boxes)
            assert torch.count_nonzero(iou - torch.diag(torch.diag(iou))) == 0
            assert (boxes.tensor[:, :2].abs() < synth.AREA).all()
            seen |= {i["bbox_label_3d"] for i in info["instances"] if i["num_lidar_pts"] > 0}
        assert seen == set(range(len(synth.CLASSES))), split


def test_tables_open_in_the_devkit_with_real_sequences(data):
    from nuscenes import NuScenes
    from pyquaternion import Quaternion

    out, _ = data
    nusc = NuScenes(version="v1.0-mini", dataroot=str(out), verbose=False)
    assert {s["name"] for s in nusc.scene} == set(synth.BOTH_TRAIN_SCENE_NAMES) | set(
        synth.VAL_SCENE_NAMES
    )
    assert len(nusc.sample) == 24
    attr_rule = {
        "vehicle.moving": True,
        "cycle.with_rider": True,
        "pedestrian.moving": True,
        "vehicle.parked": False,
        "vehicle.stopped": False,
        "cycle.without_rider": False,
        "pedestrian.standing": False,
    }
    moving = 0
    for info in _infos(out, "val"):
        sample = nusc.get("sample", info["token"])
        assert sample["timestamp"] == round(info["timestamp"] * 1e6)
        if sample["prev"]:
            assert sample["timestamp"] - nusc.get("sample", sample["prev"])["timestamp"] == 500_000
        anns = [nusc.get("sample_annotation", t) for t in sample["anns"]]
        assert len(anns) == len(info["instances"])
        to_global = (
            np.array(info["ego2global"])[:2, :2]
            @ np.array(info["lidar_points"]["lidar2ego"])[:2, :2]
        )
        for ann, ins in zip(anns, info["instances"], strict=True):
            assert (
                synth.CLASSES.index(_detection_name(ann["category_name"])) == ins["bbox_label_3d"]
            )
            assert ann["num_lidar_pts"] == ins["num_lidar_pts"]
            assert ann["size"] == pytest.approx(
                [ins["bbox_3d"][4], ins["bbox_3d"][3], ins["bbox_3d"][5]]
            )
            yaw = (
                ins["bbox_3d"][6]
                + synth.LIDAR2EGO_YAW
                + math.atan2(info["ego2global"][1][0], info["ego2global"][0][0])
            )
            assert (
                Quaternion.absolute_distance(
                    Quaternion(ann["rotation"]), Quaternion(axis=[0, 0, 1], radians=yaw)
                )
                < 1e-9
            )
            velocity = nusc.box_velocity(ann["token"])[:2]
            np.testing.assert_allclose(velocity, to_global @ np.array(ins["velocity"]), atol=1e-6)
            speed = float(np.hypot(*ins["velocity"]))
            assert speed == 0.0 or speed >= 0.5  # clear of the metric's 0.2 m/s moving threshold
            moving += speed > 0
            names = [nusc.get("attribute", t)["name"] for t in ann["attribute_tokens"]]
            if ins["bbox_label_3d"] >= synth.CLASSES.index("traffic_cone"):
                assert names == [] and speed == 0.0
            else:
                assert len(names) == 1 and attr_rule[names[0]] == (speed > 0.2)
    assert moving > 0


def _detection_name(category: str) -> str:
    from nuscenes.eval.detection.utils import category_to_detection_name

    return category_to_detection_name(category)


def test_rejects_bad_arguments(tmp_path, data):
    with pytest.raises(ConfigError, match="num_val"):
        synth.generate(tmp_path / "a", num_train=1, num_val=0)
    with pytest.raises(ConfigError, match="sweeps"):
        synth.generate(tmp_path / "b", num_train=1, num_val=1, sweeps=10)
    with pytest.raises(ConfigError, match="already holds a dataset"):
        synth.generate(data[0], num_train=1, num_val=1)


# -- table versions ---------------------------------------------------------------------------------


def _scene_names_by_split(out: Path, version: str) -> dict[str, set[str]]:
    from nuscenes import NuScenes

    nusc = NuScenes(version=version, dataroot=str(out), verbose=False)
    return {split: {nusc.get("scene", nusc.get("sample", info["token"])["scene_token"])["name"]
                    for info in _infos(out, split)} for split in ("train", "val")}


def test_both_versions_by_default_each_with_its_official_split(data):
    from nuscenes.utils.splits import create_splits_scenes

    out, summary = data
    assert summary["versions"] == ["v1.0-mini", "v1.0-trainval"] and summary["version"] == "v1.0-mini"
    splits = create_splits_scenes()
    for version, (train, val) in (("v1.0-mini", ("mini_train", "mini_val")), ("v1.0-trainval", ("train", "val"))):
        names = _scene_names_by_split(out, version)
        assert names["train"] <= set(splits[train]) and names["val"] <= set(splits[val]), version
        assert _tree_digest(out / version) == _tree_digest(out / "v1.0-mini")


def test_one_version_alone(tmp_path, data):
    from nuscenes.utils.splits import create_splits_scenes

    splits = create_splits_scenes()
    trainval = synth.generate(tmp_path / "tv", num_train=16, num_val=8, seed=0, version="v1.0-trainval",
                              gt_database=False)
    assert trainval["versions"] == ["v1.0-trainval"] and not (tmp_path / "tv" / "v1.0-mini").exists()
    names = _scene_names_by_split(tmp_path / "tv", "v1.0-trainval")
    assert names["train"] <= set(splits["train"]) and names["val"] <= set(splits["val"])
    assert len(names["train"]) == trainval["num_train_scenes"]  # 700 official names: none repeats
    with open(tmp_path / "tv" / "nuscenes_infos_val.pkl", "rb") as f:
        assert pickle.load(f)["metainfo"]["version"] == "v1.0-trainval"
    mini = synth.generate(tmp_path / "mini", num_train=16, num_val=8, seed=0, version="v1.0-mini", gt_database=False)
    assert _scene_names_by_split(tmp_path / "mini", "v1.0-mini")["train"] == set(synth.TRAIN_SCENE_NAMES)
    # the version changes scene names only: the same points and infos
    for other in ("tv", "mini"):
        mine, theirs = _tree_digest(data[0]), _tree_digest(tmp_path / other)
        assert {k: v for k, v in theirs.items() if k.startswith("samples")} == \
            {k: v for k, v in mine.items() if k.startswith("samples")}
    assert mini["num_train_boxes"] == trainval["num_train_boxes"] == data[1]["num_train_boxes"]
    with pytest.raises(ConfigError, match="version must be one of"):
        synth.generate(tmp_path / "bad", num_train=1, num_val=1, version="v1.0-test")


def test_trainval_tables_score_ground_truth_as_one(data):
    from .test_evaluation import PREFIX, _dataset, _evaluate

    out, _ = data
    val_set = (out, _dataset(out))  # NuScenesDataset's default version: v1.0-trainval, as BEVFusion's config
    assert val_set[1].metainfo["version"] == "v1.0-trainval"
    res = _evaluate(val_set, lambda ann: (ann["gt_bboxes_3d"].tensor.numpy(), ann["gt_labels_3d"]))
    assert res[f"{PREFIX}/mAP"] > 0.99 and res[f"{PREFIX}/NDS"] > 0.99


# -- the ground-truth database ----------------------------------------------------------------------


def test_gt_database_holds_every_valid_train_box_with_its_points(data):
    out, summary = data
    with open(out / synth.GT_DBINFOS, "rb") as f:
        db = pickle.load(f)
    assert summary["gt_database"]["objects"] == sum(len(v) for v in db.values()) == summary["num_train_boxes"]
    assert set(db) <= set(synth.CLASSES) and len(db) == len(synth.CLASSES)
    by_sample = {info["sample_idx"]: info for info in _infos(out, "train")}
    for name, objects in db.items():
        for obj in objects:
            pts = np.fromfile(out / obj["path"], dtype=np.float32).reshape(-1, 5)
            assert len(pts) == obj["num_points_in_gt"] > 0
            valid = [i for i in by_sample[obj["image_idx"]]["instances"] if i["bbox_3d_isvalid"]]
            ins = valid[obj["gt_idx"]]
            assert synth.CLASSES[ins["bbox_label_3d"]] == name
            # the key frame's points (no sweeps here), time column zeroed by LoadPointsFromMultiSweeps
            assert obj["num_points_in_gt"] == ins["num_lidar_pts"] and not pts[:, 4].any()
            np.testing.assert_allclose(obj["box3d_lidar"][:2], ins["bbox_3d"][:2], atol=1e-5)
            assert np.abs(pts[:, :2]).max() < max(ins["bbox_3d"][3:5])  # relative to the box centre


def test_numpy_long_shim_is_a_no_op_where_numpy_has_it(monkeypatch):
    from bevcache import compat

    assert np.long is np.int_ and np.dtype(np.long) == np.dtype("int64")  # numpy 1.26: the C long, as numpy 2's
    assert compat.patch_numpy_long() is False  # applied once at import; nothing to do again
    monkeypatch.delattr(np, "long")
    assert compat.patch_numpy_long() is True and np.long is np.int_


def test_object_sample_pastes_from_the_gt_database(data):
    from .test_pipeline import object_sample

    out, _ = data
    pipeline = PIPELINE[:2] + [object_sample(out, synth.CLASSES, use_dim=5)] + PIPELINE[2:]
    ds = _nuscenes_dataset(out, "nuscenes_infos_train.pkl", pipeline=pipeline)
    plain = _nuscenes_dataset(out, "nuscenes_infos_train.pkl")
    assert "long" in vars(np)  # mmdet3d 1.4.0's np.long on numpy 1.26: importing bevcache applied the shim
    np.random.seed(0)
    pasted, base = ds[0]["data_samples"].gt_instances_3d, plain[0]["data_samples"].gt_instances_3d
    assert len(pasted.labels_3d) > len(base.labels_3d)
    assert torch.equal(pasted.bboxes_3d.tensor[: len(base.labels_3d)], base.bboxes_3d.tensor)


@pytest.mark.slow
def test_zoo_centerpoint_trains_with_object_sample_on_the_synthetic_gt_database(data_root, tmp_path):
    """mmdet3d's own CenterPoint pillar config (ObjectSample, 9 sweeps, CBGS), only shrunk to a +-25.6 m
    grid for the CPU, trains through mmengine's Runner on the synthetic root and its gt database."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    from bevcache.data import check_data_files, set_data_root
    from bevcache.runtime import setup_runtime

    from .conftest import iteration_run
    from .test_data import zoo_config

    setup_runtime()
    cfg = zoo_config()
    set_data_root(cfg, str(data_root))
    check_data_files(cfg, ["train_dataloader"])
    pcr, grid = [-25.6, -25.6, -5.0, 25.6, 25.6, 3.0], 256
    model = cfg.model
    model.data_preprocessor.voxel_layer.point_cloud_range = model.pts_voxel_encoder.point_cloud_range = pcr
    model.pts_middle_encoder.output_shape = [grid, grid]
    model.train_cfg.pts.update(point_cloud_range=pcr, grid_size=[grid, grid, 1])
    model.pts_bbox_head.bbox_coder.pc_range = model.test_cfg.pts.pc_range = pcr[:2]
    pipeline = cfg.train_dataloader.dataset.dataset.pipeline
    assert [s.type for s in pipeline].count("ObjectSample") == 1
    for step in pipeline:
        if "point_cloud_range" in step:
            step.point_cloud_range = pcr

    class Boxes(Hook):
        def __init__(self):
            self.seen, self.losses = [], []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.seen += [(int(s.sample_idx), len(s.gt_instances_3d.labels_3d)) for s in data_batch["data_samples"]]
            self.losses.append(float(sum(v for k, v in outputs.items() if "loss" in k)))

    runner = Runner.from_cfg(iteration_run(cfg, work_dir=tmp_path, iters=2, batch_size=1, workers=0, seed=0))
    rec = Boxes()
    runner.register_hook(rec)
    runner.train()
    assert len(rec.losses) == 2 and all(np.isfinite(rec.losses))
    plain = {i["sample_idx"]: sum(x["bbox_3d_isvalid"] for x in i["instances"]) for i in _infos(data_root, "train")}
    assert any(n > plain[idx] for idx, n in rec.seen)  # pasted objects reached the model


# -- cameras (generate(cameras=True)) ---------------------------------------------------------------

CAM_PREFIX = {**DATA_PREFIX, **{c: f"samples/{c}" for c in synth.CAMERA_CHANNELS}}
# The LiDAR output of seed 7 (3+2 samples, 1 sweep, mini tables) as written before the cameras existed:
# points, tables and infos. A change here changes every LiDAR-only dataset and its teachers' caches.
LIDAR_ONLY_DIGEST = "70d922300dc800e66289e9c1b3fd19f48637c998fbc87ee2cbfd9f740959fc8e"


@pytest.fixture(scope="module")
def cam_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_cams")
    return out, synth.generate(out, num_train=4, num_val=2, seed=5, cameras=True, gt_database=False)


def _lidar_digest(root: Path) -> str:
    """Points files, the mini tables and the infos (canonical JSON: independent of numpy's pickle paths)."""
    h = hashlib.sha256()
    for rel, digest in _tree_digest(root).items():
        if rel.endswith(".pcd.bin") or rel.startswith("v1.0-mini/"):
            h.update(rel.encode() + bytes.fromhex(digest))
    for split in ("train", "val"):
        with open(root / f"nuscenes_infos_{split}.pkl", "rb") as f:
            h.update(json.dumps(pickle.load(f), sort_keys=True, default=lambda o: o.item()).encode())
    return h.hexdigest()


def _image(root: Path, info: dict, channel: str) -> np.ndarray:
    """RGB uint8 of one written camera image."""
    import cv2

    bgr = cv2.imread(str(root / "samples" / channel / info["images"][channel]["img_path"]), cv2.IMREAD_COLOR)
    assert bgr is not None, channel
    return bgr[..., ::-1]


def _views(info: dict) -> tuple[list, list]:
    return (
        [info["images"][c]["lidar2cam"] for c in synth.CAMERA_CHANNELS],
        [info["images"][c]["cam2img"] for c in synth.CAMERA_CHANNELS],
    )


def test_without_cameras_the_lidar_output_is_unchanged(tmp_path):
    synth.generate(tmp_path / "r", num_train=3, num_val=2, seed=7, sweeps=1, version="v1.0-mini", gt_database=False)
    assert _lidar_digest(tmp_path / "r") == LIDAR_ONLY_DIGEST
    assert not any((tmp_path / "r" / "samples").glob("CAM_*"))


def test_cameras_draw_no_lidar_randomness(tmp_path, cam_data, monkeypatch):
    """With cameras only the cue's shared geometry changes the LiDAR: a LiDAR-only run given the same
    class specs writes bit-identical points, boxes and counts."""
    cue_specs = synth._specs(cue=True)
    monkeypatch.setattr(synth, "_specs", lambda cue, trace=0.0: cue_specs)
    synth.generate(tmp_path / "lidar", num_train=4, num_val=2, seed=5, gt_database=False)
    with_cams, lidar_only = _tree_digest(cam_data[0]), _tree_digest(tmp_path / "lidar")
    points = {k: v for k, v in with_cams.items() if k.endswith(".pcd.bin")}
    assert points == {k: v for k, v in lidar_only.items() if k.endswith(".pcd.bin")} and points
    for split in ("train", "val"):
        for a, b in zip(_infos(cam_data[0], split), _infos(tmp_path / "lidar", split), strict=True):
            assert a["instances"] == b["instances"] and a["token"] == b["token"]


def _cue_scene(specs):
    """One scanned frame with cue objects, and the same frame with every cue object relabelled as the other
    cue class (same boxes, same random draws)."""
    scene = synth._simulate_scene(seed=2, split="train", split_id=0, scene_idx=0, name="scene-0061", n_samples=1,
                                  sweeps=0, specs=specs)
    swap = {synth.CLASSES.index(a): synth.CLASSES.index(b) for a, b in (synth.CUE_CLASSES, synth.CUE_CLASSES[::-1])}
    swapped = [synth._Object(swap.get(o.label, o.label), o.lwh, o.p0, o.vel, o.yaw) for o in scene.objects]
    boxes = synth._boxes_at(scene.objects, 0.0)
    cue_boxes = np.array([o.label in swap for o in scene.objects])
    assert cue_boxes.any()
    return (synth._scan(boxes, scene.objects, np.random.default_rng(0), specs),
            synth._scan(boxes, swapped, np.random.default_rng(0), specs), cue_boxes)


def test_cue_classes_look_identical_to_the_lidar():
    specs = synth._specs(cue=True)
    bike, moto = (specs[synth.CLASSES.index(c)] for c in synth.CUE_CLASSES)
    lidar_fields = ("size", "vmax", "p_moving", "weight", "intensity", "eval_range", "moving_attr", "static_attr")
    assert all(getattr(bike, f) == getattr(moto, f) for f in lidar_fields)
    assert synth.CLASS_COLOURS["bicycle"] != synth.CLASS_COLOURS["motorcycle"]
    # Relabelling every cue object as the other cue class leaves the scan bit-identical (points, intensity, ring).
    (pts, counts), (pts_b, counts_b), _ = _cue_scene(specs)
    assert np.array_equal(pts, pts_b) and np.array_equal(counts, counts_b)
    # Without cameras the classes keep their own sizes (the LiDAR-only data are unchanged).
    assert synth._specs(cue=False) == synth._SPECS and synth._SPECS[5].size != synth._SPECS[6].size


def test_cue_lidar_trace_splits_only_the_cue_classes_return_intensity():
    """With a trace the cue classes still share every other LiDAR property; relabelling a cue object as the
    other cue class changes nothing but the intensity of its own returns, by the trace's ratio."""
    trace = 0.1
    specs = synth._specs(cue=True, trace=trace)
    bike, moto = (specs[synth.CLASSES.index(c)] for c in synth.CUE_CLASSES)
    shared = ("size", "vmax", "p_moving", "weight", "eval_range", "moving_attr", "static_attr")
    assert all(getattr(bike, f) == getattr(moto, f) for f in shared)
    ratio = (1 + trace / 2) / (1 - trace / 2)
    assert moto.intensity / bike.intensity == pytest.approx(ratio)
    assert (bike.intensity + moto.intensity) / 2 == pytest.approx(synth.CUE_GEOMETRY["intensity"])
    assert synth._specs(cue=True, trace=0.0) == synth._specs(cue=True)  # no trace: the LiDAR-identical cue
    assert all(a == b for a, b, c in zip(specs, synth._specs(cue=True), synth.CLASSES, strict=True)
               if c not in synth.CUE_CLASSES)

    (pts, counts), (pts_b, counts_b), cue_boxes = _cue_scene(specs)
    assert np.array_equal(counts, counts_b) and np.array_equal(pts[:, [0, 1, 2, 4]], pts_b[:, [0, 1, 2, 4]])
    changed = pts[:, 3] != pts_b[:, 3]
    assert changed.sum() == counts[cue_boxes].sum() > 0  # exactly the cue objects' returns
    scale = pts_b[changed, 3] / pts[changed, 3]
    assert np.all(np.isclose(scale, ratio, rtol=1e-5) | np.isclose(scale, 1 / ratio, rtol=1e-5))


def test_cue_lidar_trace_end_to_end_changes_only_point_intensities(tmp_path, cam_data):
    out = tmp_path / "trace"
    summary = synth.generate(out, num_train=4, num_val=2, seed=5, cameras=True, gt_database=False,
                             cue_lidar_trace=0.2)
    recorded = summary["cameras"]["cue"]["lidar_trace"]
    assert recorded["relative_intensity_difference"] == 0.2
    assert "lidar_trace" not in cam_data[1]["cameras"]["cue"]  # the default writes what it always wrote
    with open(out / "nuscenes_infos_train.pkl", "rb") as f:
        assert pickle.load(f)["metainfo"]["synth_camera_cue"] == summary["cameras"]["cue"]
    traced, plain = _tree_digest(out), _tree_digest(cam_data[0])
    assert {k: v for k, v in traced.items() if k.endswith(".jpg")} == {k: v for k, v in plain.items()
                                                                      if k.endswith(".jpg")}
    for split in ("train", "val"):
        for a, b in zip(_infos(out, split), _infos(cam_data[0], split), strict=True):
            assert a["instances"] == b["instances"]
            pa, pb = _points(out, a), _points(cam_data[0], b)
            assert np.array_equal(pa[:, [0, 1, 2, 4]], pb[:, [0, 1, 2, 4]])
    assert any(not np.array_equal(_points(out, a)[:, 3], _points(cam_data[0], b)[:, 3])
               for a, b in zip(_infos(out, "train"), _infos(cam_data[0], "train"), strict=True))


@pytest.mark.parametrize("trace, cameras, message", [
    (0.1, False, "needs cameras=True"), (-0.1, True, r"\[0, 0.5\]"), (0.6, True, r"\[0, 0.5\]"),
    (float("nan"), True, r"\[0, 0.5\]"), ("x", True, r"\[0, 0.5\]"),
])
def test_rejects_a_bad_cue_lidar_trace(tmp_path, trace, cameras, message):
    with pytest.raises(ConfigError, match=message):
        synth.generate(tmp_path / "r", num_train=1, num_val=1, cameras=cameras, cue_lidar_trace=trace)
    assert not (tmp_path / "r").exists()  # refused before writing anything


def test_camera_infos_have_the_real_fixtures_keys_and_consistent_matrices(cam_data):
    with open(FIXTURE / "nus_info.pkl", "rb") as f:
        real = pickle.load(f)["data_list"][0]["images"]
    out, summary = cam_data
    width, height = summary["cameras"]["image_size"]
    assert (width, height) == synth.DEFAULT_IMAGE_SIZE
    for info in _infos(out, "train") + _infos(out, "val"):
        images = info["images"]
        assert list(images) == list(real) == list(synth.CAMERA_CHANNELS)
        lidar2ego = np.array(info["lidar_points"]["lidar2ego"])
        for channel, cam in images.items():
            assert list(cam) == list(real[channel]) and _signature(cam) == _signature(real[channel])
            assert (out / "samples" / channel / cam["img_path"]).is_file() and channel in cam["img_path"]
            assert cam["timestamp"] == info["timestamp"]  # rendered at the key frame: boxes and image agree
            # parked ego: the camera-to-LiDAR chain closes through the ego frame
            np.testing.assert_allclose(np.array(cam["cam2ego"]) @ np.array(cam["lidar2cam"]), lidar2ego, atol=1e-12)
            k = np.array(cam["cam2img"])
            assert k[0, 2] == width / 2 and k[1, 2] == height / 2
            assert _image(out, info, channel).shape == (height, width, 3)
    # nuScenes' own field of view: the front camera's focal length scaled to the image width
    k = np.array(images["CAM_FRONT"]["cam2img"])
    assert k[0, 0] == pytest.approx(1266.0 * width / 1600)


def test_cameras_load_through_nuscenes_dataset_and_the_multiview_loader(cam_data):
    out, _ = cam_data
    pipeline = [
        dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
        dict(type="LoadMultiViewImageFromFiles", to_float32=False, color_type="color", num_views=6),
    ]
    # the camera prefixes as BEVFusion's config sets them
    ds = _nuscenes_dataset(out, "nuscenes_infos_val.pkl", pipeline=pipeline, data_prefix=CAM_PREFIX, test_mode=True,
                           modality=dict(use_camera=True, use_lidar=True))
    item = ds[0]
    info = next(i for i in _infos(out, "val") if i["sample_idx"] == item["sample_idx"])
    assert len(item["img"]) == 6 and len(item["filename"]) == 6
    for channel, img, path, cam2img, lidar2cam in zip(synth.CAMERA_CHANNELS, item["img"], item["filename"],
                                                      item["cam2img"], item["lidar2cam"], strict=True):
        assert Path(path) == out / "samples" / channel / info["images"][channel]["img_path"]
        assert img.shape == _image(out, info, channel).shape
        np.testing.assert_array_equal(img[..., ::-1], _image(out, info, channel))  # the loader reads BGR
        assert np.array_equal(cam2img, info["images"][channel]["cam2img"])
        assert np.array_equal(lidar2cam, info["images"][channel]["lidar2cam"])
    assert len(item["points"]) == len(_points(out, info))


def test_projected_box_corners_bound_each_objects_pixels(cam_data):
    out, summary = cam_data
    size = tuple(summary["cameras"]["image_size"])
    checked = tight = 0
    for info in _infos(out, "val")[:1]:
        boxes = np.array([i["bbox_3d"] for i in info["instances"]])
        lidar2cam, cam2img = _views(info)
        _, ids = synth.render_views(boxes, lidar2cam, cam2img, size)
        for k, box in enumerate(boxes):
            _, alone = synth.render_views(box[None], lidar2cam, cam2img, size)
            for v in range(6):
                uv, z = synth.project(synth._box_corners(box), lidar2cam[v], cam2img[v])
                assert not ((ids[v] == k) & (alone[v] != 0)).any()  # occlusion only removes pixels
                if (z <= synth.NEAR_PLANE).any():
                    continue
                rows, cols = np.nonzero(alone[v] == 0)
                if len(rows) == 0:
                    continue
                lo, hi = uv.min(axis=0), uv.max(axis=0)
                centres = np.stack([cols + 0.5, rows + 0.5], axis=1)
                assert (centres >= lo - 1e-6).all() and (centres <= hi + 1e-6).all(), (k, v)
                checked += 1
                # Inside the image the silhouette is the corners' hull, so it reaches their bbox (to the
                # pixel-centre sampling: a sharp vertex can poke a little past the last sampled centre).
                if (lo >= 0).all() and (hi <= size).all():
                    assert np.abs(centres.min(axis=0) - lo).max() <= 2.0 and np.abs(centres.max(axis=0) - hi).max() <= 2.0
                    tight += 1
    assert checked >= 10 and tight >= 5


def test_cue_colours_paint_the_cue_objects_pixels(cam_data):
    out, summary = cam_data
    size = tuple(summary["cameras"]["image_size"])
    cue = {synth.CLASSES.index(c): np.array(synth.CLASS_COLOURS[c], dtype=float) for c in synth.CUE_CLASSES}
    seen = dict.fromkeys(cue, 0)
    for info in _infos(out, "val"):
        boxes = np.array([i["bbox_3d"] for i in info["instances"]])
        labels = np.array([i["bbox_label_3d"] for i in info["instances"]])
        _, ids = synth.render_views(boxes, *_views(info), size)
        for v, channel in enumerate(synth.CAMERA_CHANNELS):
            img = _image(out, info, channel).astype(float)
            label_map = np.where(ids[v] >= 0, labels[ids[v]], -1)
            for label, colour in cue.items():
                mask = label_map == label
                interior = mask & np.roll(mask, 2, 0) & np.roll(mask, -2, 0) & np.roll(mask, 2, 1) & np.roll(mask, -2, 1)
                if interior.sum() >= 20:
                    mean = img[interior].mean(axis=0)
                    # shaded and brightness-varied, but the hue is the class's: the right dominant channel
                    other = next(c for lbl, c in cue.items() if lbl != label)
                    assert np.dot(mean / np.linalg.norm(mean), colour / np.linalg.norm(colour)) > \
                        np.dot(mean / np.linalg.norm(mean), other / np.linalg.norm(other)) + 0.3
                    seen[label] += 1
                # No other pixel carries the cue: a bright, pure cue hue only on (or a JPEG block from) such objects.
                dominant = int(np.argmax(colour))
                rest = [c for c in range(3) if c != dominant]
                strong = (img[..., dominant] > 90) & (img[..., rest].max(axis=-1) < 0.3 * img[..., dominant])
                near = np.zeros_like(mask)
                for dy in range(-4, 5):
                    for dx in range(-4, 5):
                        near |= np.roll(mask, (dy, dx), (0, 1))
                assert not (strong & ~near).any(), (channel, synth.CLASSES[label])
    assert all(n > 0 for n in seen.values()), seen


def test_cameras_are_deterministic_per_seed(tmp_path, cam_data):
    synth.generate(tmp_path / "again", num_train=4, num_val=2, seed=5, cameras=True, gt_database=False)
    first = _tree_digest(cam_data[0])
    assert sum(p.endswith(".jpg") for p in first) == (4 + 2) * 6
    assert _tree_digest(tmp_path / "again") == first
    synth.generate(tmp_path / "other", num_train=4, num_val=2, seed=6, cameras=True, gt_database=False)
    jpgs = {h for p, h in first.items() if p.endswith(".jpg")}
    assert jpgs.isdisjoint(h for p, h in _tree_digest(tmp_path / "other").items() if p.endswith(".jpg"))


def test_camera_tables_open_in_the_devkit(cam_data):
    from nuscenes import NuScenes
    from pyquaternion import Quaternion

    out, summary = cam_data
    nusc = NuScenes(version="v1.0-mini", dataroot=str(out), verbose=False)
    width, height = summary["cameras"]["image_size"]
    for info in _infos(out, "train"):
        sample = nusc.get("sample", info["token"])
        assert set(sample["data"]) == {"LIDAR_TOP", *synth.CAMERA_CHANNELS}
        for channel, cam in info["images"].items():
            sd = nusc.get("sample_data", sample["data"][channel])
            assert sd["token"] == cam["sample_data_token"] and sd["is_key_frame"]
            assert (sd["width"], sd["height"], sd["fileformat"]) == (width, height, "jpg")
            assert Path(nusc.get_sample_data_path(sd["token"])) == out / "samples" / channel / cam["img_path"]
            cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
            assert cs["camera_intrinsic"] == cam["cam2img"]
            cam2ego = Quaternion(cs["rotation"]).transformation_matrix
            cam2ego[:3, 3] = cs["translation"]
            np.testing.assert_allclose(cam2ego, cam["cam2ego"], atol=1e-12)
            if sample["prev"]:  # each camera's own sequence
                assert sd["prev"] == nusc.get("sample", sample["prev"])["data"][channel]


def test_camera_data_score_ground_truth_as_one(cam_data):
    from .test_evaluation import PREFIX, _dataset, _evaluate

    out, _ = cam_data
    res = _evaluate((out, _dataset(out)), lambda ann: (ann["gt_bboxes_3d"].tensor.numpy(), ann["gt_labels_3d"]))
    assert res[f"{PREFIX}/mAP"] > 0.99 and res[f"{PREFIX}/NDS"] > 0.99


@pytest.mark.parametrize("size", [(16, 9), (384, 216.5), "384x216", (384,)])
def test_rejects_bad_image_sizes(tmp_path, size):
    with pytest.raises(ConfigError, match="image_size"):
        synth.generate(tmp_path / "r", num_train=1, num_val=1, cameras=True, image_size=size)
    assert not (tmp_path / "r").exists()  # refused before writing anything
