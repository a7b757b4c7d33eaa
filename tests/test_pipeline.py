"""bevcache.pipeline: random train steps found by running them on real samples, stripped exactly."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from mmcv.transforms import BaseTransform

from bevcache import pipeline as bp
from bevcache.errors import ConfigError

from .conftest import tiny_cfg

DETERMINISTIC = ("LoadPointsFromFile", "LoadAnnotations3D", "PointsRangeFilter", "ObjectRangeFilter",
                 "ObjectNameFilter", "Pack3DDetInputs")


# -- transforms a project could register under names bevcache has never heard of -------------------


class PointDropout(BaseTransform):
    """Like a project's own augmentation: numpy's global RNG under an unknown name."""

    def transform(self, results: dict) -> dict:
        results["points"] = results["points"][np.random.rand(len(results["points"])) > 0.1]
        return results


class UnseededJitter(BaseTransform):
    """Random, but from its own generator that nobody seeds: not replayable."""

    def __init__(self) -> None:
        self.rng = np.random.default_rng()

    def transform(self, results: dict) -> dict:
        results["points"].translate(self.rng.normal(0.0, 0.01, 3))
        return results


class DropEverything(BaseTransform):
    def transform(self, results: dict) -> None:
        return None


class CoinDrop(BaseTransform):
    """Drops the sample (returns None) half of the time."""

    def transform(self, results: dict) -> dict | None:
        return None if np.random.rand() < 0.5 else results


def _register() -> None:
    from mmdet3d.registry import TRANSFORMS

    for cls in (PointDropout, UnseededJitter, DropEverything, CoinDrop):
        TRANSFORMS.register_module(name=f"BevcacheTest{cls.__name__}", module=cls, force=True)


def object_sample(data_root: Path, class_names, use_dim: int = 4) -> dict:
    """ObjectSample as mmdet3d's nuScenes configs use it, on the synthetic data root's gt database."""
    return dict(type="ObjectSample", db_sampler=dict(
        data_root=f"{data_root}/", info_path=f"{data_root}/nuscenes_dbinfos_train.pkl", rate=1.0,
        prepare=dict(filter_by_difficulty=[-1], filter_by_min_points={c: 5 for c in class_names}),
        classes=list(class_names),
        sample_groups=dict(car=2, truck=3, construction_vehicle=7, bus=4, trailer=6, barrier=2, motorcycle=6,
                           bicycle=6, pedestrian=2, traffic_cone=2),
        points_loader=dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=use_dim)))


def augmented_with_object_sample(cfg, data_root: Path) -> list[dict]:
    """The tiny configs' augmented train pipeline with ObjectSample after the annotations."""
    steps = copy.deepcopy(cfg.augmented_train_pipeline.to_list() if hasattr(cfg.augmented_train_pipeline, "to_list")
                          else list(cfg.augmented_train_pipeline))
    steps = [dict(s) for s in steps]
    return steps[:2] + [object_sample(data_root, cfg.class_names)] + steps[2:]


@pytest.fixture(scope="module")
def cfg(data_root):
    _register()
    return tiny_cfg("tiny_teacher.py", data_root)


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    monkeypatch.setattr(bp, "_PROBES", {})


def _types(steps) -> list[str]:
    return [s.type for s in steps]


def test_random_steps_are_found_by_their_output_not_their_name(cfg, data_root, caplog):
    steps = augmented_with_object_sample(cfg, data_root)
    steps.insert(len(steps) - 1, dict(type="BevcacheTestPointDropout"))
    with caplog.at_level(logging.INFO, logger="bevcache"):
        found = bp.random_steps(steps, cfg.train_dataloader.dataset)
    expected = {i: s["type"] for i, s in enumerate(steps)
                if s["type"] in ("ObjectSample", "GlobalRotScaleTrans", "RandomFlip3D", "PointShuffle",
                                 "BevcacheTestPointDropout")}
    assert {s.position: s.type for s in found} == {(i,): t for i, t in expected.items()}
    assert all(s.evidence == "observed" for s in found)
    assert not set(_types(found)) & set(DETERMINISTIC)
    assert "BevcacheTestPointDropout draws random numbers" in caplog.text  # unknown name, found by probing


def test_strip_removes_exactly_the_random_steps_and_the_rest_is_deterministic(cfg, data_root):
    from mmdet3d.registry import DATASETS

    steps = augmented_with_object_sample(cfg, data_root)
    steps.insert(len(steps) - 1, dict(type="BevcacheTestPointDropout"))
    found = bp.random_steps(steps, cfg.train_dataloader.dataset)
    stripped = bp.strip_steps(steps, found)
    assert [s["type"] for s in stripped] == [s["type"] for s in steps if s["type"] not in _types(found)]
    assert [s["type"] for s in stripped] == list(DETERMINISTIC)
    assert steps[2]["type"] == "ObjectSample"  # the input config is untouched
    assert bp.random_steps(stripped, cfg.train_dataloader.dataset) == []
    dataset = DATASETS.build(dict(copy.deepcopy(cfg.train_dataloader.dataset), pipeline=stripped))
    with bp.seeded_rngs(1):
        a = dataset.prepare_data(3)
    with bp.seeded_rngs(2):
        b = dataset.prepare_data(3)
    assert torch.equal(a["inputs"]["points"], b["inputs"]["points"])
    with pytest.raises(ConfigError, match=r"pipeline\[9\] is not BevcacheTestPointDropout in this pipeline"):
        bp.strip_steps(stripped, found)  # positions belong to the probed pipeline


def test_a_known_random_transform_that_never_changes_is_kept_as_random_and_logged(cfg, caplog):
    steps = [dict(s) for s in cfg.train_pipeline]
    steps.insert(2, dict(type="GlobalRotScaleTrans", rot_range=[0, 0], scale_ratio_range=[1, 1],
                         translation_std=[0, 0, 0]))
    with caplog.at_level(logging.WARNING, logger="bevcache"):
        found = bp.random_steps(steps, cfg.train_dataloader.dataset)
    assert [(s.position, s.type, s.evidence) for s in found] == [((2,), "GlobalRotScaleTrans", "name")]
    assert "known random transform but never changed its output" in caplog.text


def test_a_step_that_drops_the_sample_does_not_break_the_probe(cfg, caplog):
    steps = [dict(s) for s in cfg.train_pipeline]
    coin = steps[:2] + [dict(type="BevcacheTestCoinDrop")] + steps[2:]
    assert _types(bp.random_steps(coin, cfg.train_dataloader.dataset)) == ["BevcacheTestCoinDrop"]
    drop = steps[:2] + [dict(type="BevcacheTestDropEverything"), dict(type="BevcacheTestPointDropout")] + steps[2:]
    with caplog.at_level(logging.WARNING, logger="bevcache"):
        assert bp.random_steps(drop, cfg.train_dataloader.dataset) == []
    assert "pipeline[3] BevcacheTestPointDropout" in caplog.text and "never ran" in caplog.text


def test_nested_random_steps_are_found_and_stripped_inside_their_wrapper(cfg):
    steps = [dict(s) for s in cfg.train_pipeline][:2] + [
        dict(type="MultiScaleFlipAug3D", img_scale=(1333, 800), pts_scale_ratio=1, flip=False,
             transforms=[dict(type="GlobalRotScaleTrans", rot_range=[-0.3, 0.3], scale_ratio_range=[1.0, 1.0],
                              translation_std=[0, 0, 0]),
                         dict(type="RandomFlip3D")]),  # the wrapper fixes the flips
        dict(type="Pack3DDetInputs", keys=["points"])]
    found = bp.random_steps(steps, cfg.train_dataloader.dataset)
    assert [(s.position, s.type) for s in found] == [((2, 0), "GlobalRotScaleTrans")]
    assert found[0].where() == "pipeline[2].transforms[0]"
    stripped = bp.strip_steps(steps, found)
    assert [t["type"] for t in stripped[2]["transforms"]] == ["RandomFlip3D"]
    assert bp.random_steps(stripped, cfg.train_dataloader.dataset) == []


def test_multisweep_loading_is_random_and_made_deterministic_not_removed(cfg, tmp_path):
    from bevcache.synth import generate

    generate(tmp_path, num_train=3, num_val=1, seed=3, sweeps=2, version="v1.0-mini", gt_database=False)
    dataset = dict(copy.deepcopy(cfg.train_dataloader.dataset), data_root=f"{tmp_path}/")
    steps = [dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=5),
             dict(type="LoadPointsFromMultiSweeps", sweeps_num=1, use_dim=[0, 1, 2, 3, 4]),  # 1 of 2 sweeps
             dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
             dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"])]
    found = bp.random_steps(steps, dataset)
    assert [(s.position, s.type) for s in found] == [((1,), "LoadPointsFromMultiSweeps")]
    stripped = bp.strip_steps(steps, found)
    assert [s["type"] for s in stripped] == [s["type"] for s in steps] and stripped[1]["test_mode"] is True
    assert bp.random_steps(stripped, dataset) == []


def test_probe_results_are_cached_per_pipeline_and_dataset(cfg, data_root):
    steps = [dict(s) for s in cfg.augmented_train_pipeline]
    first = bp.probe_pipeline(steps, cfg.train_dataloader.dataset)
    assert bp.probe_pipeline(copy.deepcopy(steps), cfg.train_dataloader.dataset) is first
    assert bp.probe_pipeline(steps, cfg.train_dataloader.dataset, samples=[1]) is not first
    assert first.samples == (0, 6) and first.unreplayable == ()


def test_check_replayable_names_a_transform_the_seed_does_not_fix(cfg, data_root):
    steps = augmented_with_object_sample(cfg, data_root)
    assert _types(bp.check_replayable(steps, cfg.train_dataloader.dataset)) == [
        "ObjectSample", "GlobalRotScaleTrans", "RandomFlip3D", "PointShuffle"]
    steps.insert(3, dict(type="BevcacheTestUnseededJitter"))
    with pytest.raises(ConfigError, match=r"BevcacheTestUnseededJitter \(step 3 BevcacheTestUnseededJitter on dataset "
                                          r"index 0\) gave two different outputs for the same seed"):
        bp.check_replayable(steps, cfg.train_dataloader.dataset)


def test_same_output_compares_nested_arrays_tensors_and_boxes():
    from mmdet3d.structures import LiDARInstance3DBoxes

    boxes = LiDARInstance3DBoxes(torch.arange(14.0).reshape(2, 7))
    a = {"b": boxes, "x": [np.array([1.0, np.nan]), torch.tensor([1, 2])], "s": 0.5, "n": None}
    b = copy.deepcopy(a)
    assert bp.same_output(a, b)
    b["b"].tensor[0, 6] += 1e-6
    assert not bp.same_output(a, b)
    assert not bp.same_output(a, dict(a, x=[np.array([1.0, 2.0]), torch.tensor([1, 2])]))
    assert not bp.same_output(a, None) and bp.same_output(None, None)
