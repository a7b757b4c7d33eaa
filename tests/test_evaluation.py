"""SafeNuScenesMetric on synthetic nuScenes: the unchanged NuScenes protocol, plus a clean zero for no boxes."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from bevcache import synth

PREFIX = "NuScenes metric/pred_instances_3d_NuScenes"


# The order mmdet3d's CenterPoint configs use: labels are remapped through the dataset's metainfo.
CENTERPOINT_ORDER = (
    "car",
    "truck",
    "construction_vehicle",
    "bus",
    "trailer",
    "barrier",
    "motorcycle",
    "bicycle",
    "pedestrian",
    "traffic_cone",
)


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth_eval")
    synth.generate(out, num_train=2, num_val=8, seed=1)
    return out


def _dataset(root, **metainfo):
    from mmdet3d.datasets import NuScenesDataset
    from mmdet3d.utils import register_all_modules

    import bevcache.evaluation  # noqa: F401  (registers SafeNuScenesMetric)

    register_all_modules()
    return NuScenesDataset(
        data_root=str(root),
        ann_file="nuscenes_infos_val.pkl",
        test_mode=True,
        data_prefix=dict(pts="samples/LIDAR_TOP", img="", sweeps="sweeps/LIDAR_TOP"),
        metainfo=metainfo or None,
    )


@pytest.fixture(scope="module")
def val_set(val_root):
    return val_root, _dataset(val_root, version="v1.0-mini")


def _evaluate(val_set, predict) -> dict[str, float]:
    """Run the registry-built metric as the test loop would: dataset_meta from the dataset, one sample per process()."""
    from mmdet3d.registry import METRICS
    from mmdet3d.structures import LiDARInstance3DBoxes

    out, ds = val_set
    metric = METRICS.build(
        dict(
            type="SafeNuScenesMetric",
            data_root=str(out),
            ann_file=str(out / "nuscenes_infos_val.pkl"),
            metric="bbox",
        )
    )
    metric.dataset_meta = ds.metainfo
    for idx in range(len(ds)):
        info = ds.get_data_info(idx)
        boxes, labels = predict(info["eval_ann_info"])
        pred = {
            "bboxes_3d": LiDARInstance3DBoxes(
                torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 9), box_dim=9
            ),
            "scores_3d": torch.ones(len(labels)),
            "labels_3d": torch.as_tensor(labels).long(),
        }
        metric.process(
            {},
            [{"pred_instances_3d": pred, "pred_instances": {}, "sample_idx": info["sample_idx"]}],
        )
    return metric.evaluate(len(ds))


def test_version_comes_from_the_dataset_config_not_the_pkl(val_set):
    assert val_set[1].metainfo["version"] == "v1.0-mini"
    # the pkl says v1.0-mini too, but NuScenesDataset's class default wins without a config value
    assert _dataset(val_set[0]).metainfo["version"] == "v1.0-trainval"


@pytest.mark.parametrize("classes", [synth.CLASSES, CENTERPOINT_ORDER])
def test_ground_truth_as_predictions_scores_one(val_root, classes):
    # eval_ann_info holds the boxes NuScenesDataset built (bottom centre, 9 values with velocity)
    val_set = (val_root, _dataset(val_root, version="v1.0-mini", classes=classes))
    res = _evaluate(val_set, lambda ann: (ann["gt_bboxes_3d"].tensor.numpy(), ann["gt_labels_3d"]))
    assert res[f"{PREFIX}/mAP"] > 0.99
    assert res[f"{PREFIX}/NDS"] > 0.99
    for err in (
        "mATE",
        "mASE",
        "mAOE",
        "mAVE",
        "mAAE",
    ):  # attributes and velocities follow the metric's rules
        assert res[f"{PREFIX}/{err}"] < 1e-3, err
    for name in synth.CLASSES:
        assert res[f"{PREFIX}/{name}_AP_dist_0.5"] > 0.99, name


def test_zero_predictions_give_zero_not_a_crash(val_set):
    from mmengine.logging import MMLogger

    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        res = _evaluate(val_set, lambda ann: (np.zeros((0, 9)), np.zeros(0, dtype=np.int64)))
    finally:
        logger.removeHandler(handler)
    assert res[f"{PREFIX}/mAP"] == 0.0 and res[f"{PREFIX}/NDS"] == 0.0
    assert res[f"{PREFIX}/mATE"] == 1.0 and res[f"{PREFIX}/car_AP_dist_4.0"] == 0.0
    assert (
        math.isnan(res[f"{PREFIX}/traffic_cone_orient_err"])
        and res[f"{PREFIX}/car_orient_err"] == 1.0
    )
    assert any("no predicted boxes" in r.getMessage() for r in records)
    # the keys are exactly those of a real evaluation
    one_box = _evaluate(
        val_set, lambda ann: (ann["gt_bboxes_3d"].tensor.numpy()[:1], ann["gt_labels_3d"][:1])
    )
    assert set(res) == set(one_box)


def test_random_boxes_score_near_zero(val_set):
    rng = np.random.default_rng(0)

    def random_boxes(ann):
        n = 40
        labels = rng.integers(0, len(synth.CLASSES), n)
        size = np.array([synth._SPECS[c].size for c in labels])
        xy = rng.uniform(-synth.AREA, synth.AREA, (n, 2))
        z = np.full((n, 1), synth.GROUND_Z)
        return np.hstack(
            [xy, z, size, rng.uniform(-np.pi, np.pi, (n, 1)), rng.normal(0, 2, (n, 2))]
        ), labels

    res = _evaluate(val_set, random_boxes)
    assert res[f"{PREFIX}/mAP"] < 0.05
