"""Spatial distillation through plain `Runner.from_cfg` (configs/tiny_student_crd.py with
`spatial=dict(...)`, `augmentation='warp'`, the teacher's augmented train pipeline and
TeacherRowsDataset): the spatial losses are logged; under 2 loader workers each sample's cached
map is warped by that sample's own augmentation, on the main process or prepared by the workers
(`prepare`), and the prepared batch gives exactly the main process's targets and loss; transforms
a warp cannot express are refused unless `spatial.ignore_non_warpable=True`; a missing
TeacherRowsDataset is refused with the fix."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from mmcv.transforms import BaseTransform
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from bevcache.errors import ConfigError
from bevcache.store import open_store
from bevcache.warp import bev_transform, warp_bev

from .conftest import CONFIGS, iteration_run
from .test_pipeline import object_sample


class BevcacheTestRandomNudge(BaseTransform):
    """A random transform bevcache has never heard of: shifts every point along x by U(-0.2, 0.2) m."""

    def transform(self, results: dict) -> dict:
        results["points"].translate([float(np.random.uniform(-0.2, 0.2)), 0.0, 0.0])
        return results


def _register() -> None:
    from mmdet3d.registry import TRANSFORMS

    TRANSFORMS.register_module(name="BevcacheTestRandomNudge", module=BevcacheTestRandomNudge, force=True)


def spatial_config(data_root: Path, store: str, work_dir: Path, *, iters: int = 2, workers: int = 0,
                   rows_wrapper: bool = True, extra_steps: tuple = (), prepare: dict | None = None,
                   **spatial) -> Config:
    """configs/tiny_student_crd.py distilling pts_neck maps with augmentation='warp' on the teacher's
    augmented train pipeline (plus `extra_steps` after its annotations), as a short run."""
    from bevcache.data import set_data_root

    cfg = Config.fromfile(str(CONFIGS / "tiny_student_crd.py"))
    set_data_root(cfg, str(data_root))
    pipeline = [dict(step) for step in cfg.augmented_train_pipeline]
    cfg.train_dataloader.dataset.pipeline = pipeline[:2] + list(extra_steps) + pipeline[2:]
    cfg.model.update(cache=store, augmentation="warp", spatial=dict(layers=dict(pts_neck="pts_neck"), **spatial))
    cfg = iteration_run(cfg, work_dir=work_dir, iters=iters, batch_size=2, workers=workers, seed=11)
    if rows_wrapper:
        cfg.train_dataloader.dataset = dict(type="TeacherRowsDataset", dataset=cfg.train_dataloader.dataset,
                                            cache=store, spatial=["pts_neck"], prepare=prepare)
    return cfg


class Losses(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append({k: float(v) for k, v in outputs.items()})


class WarpWitness(Hook):
    """Records, per step, the samples the distiller got and the teacher maps its spatial loss was
    given (after the warp), through torch forward pre-hooks: nothing in bevcache is patched."""

    def __init__(self):
        self.steps: list[dict] = []

    def before_train(self, runner) -> None:
        model = runner.model

        def samples_in(module, args, kwargs):
            if kwargs.get("mode") == "loss":
                self.steps.append({"samples": kwargs["data_samples"]})

        def loss_in(module, args):
            student, teacher, valid, fg = args
            self.steps[-1].update(teacher=teacher.detach().clone(), valid=valid.detach().clone())

        model.register_forward_pre_hook(samples_in, with_kwargs=True)
        model.spatial_loss["pts_neck"].register_forward_pre_hook(loss_in)


def train(cfg: Config, *hooks: Hook) -> tuple[Runner, Losses]:
    runner = Runner.from_cfg(cfg)
    rec = Losses()
    for hook in (rec, *hooks):
        runner.register_hook(hook)
    runner.train()
    return runner, rec


def _log(runner: Runner) -> str:
    return (Path(runner.log_dir) / f"{Path(runner.log_dir).name}.log").read_text()


def _base(dataset):
    while hasattr(dataset, "dataset"):
        dataset = dataset.dataset
    return dataset


def test_two_workers_warp_each_samples_own_map_by_its_own_augmentation(data_root, spatial_store, tmp_path):
    witness = WarpWitness()
    runner, rec = train(spatial_config(data_root, spatial_store, tmp_path, workers=2, contrastive=True), witness)
    assert len(rec.losses) == 2
    for losses in rec.losses:
        assert losses["loss_spatial_pts_neck"] > 0 and "loss_spatial_nce_pts_neck" in losses
        assert "loss_crd_pts_neck" in losses
    log = _log(runner)
    assert "loss_spatial_pts_neck" in log and "loss_spatial_nce_pts_neck" in log
    assert "cached BEV maps are warped into each sample's augmented frame" in log

    store, base = open_store(spatial_store), _base(runner.train_dataloader.dataset)
    bev_range = runner.model.spatial_cfg["bev_range"]
    transforms = []
    assert len(witness.steps) == 2  # one batch from each loader worker
    for step in witness.steps:
        assert step["teacher"].shape == (2, 512, 16, 16)
        for k, sample in enumerate(step["samples"]):
            row, meta = int(sample.metainfo["sample_idx"]), sample.metainfo
            a = bev_transform(meta)  # this sample's own augmentation, from its own metainfo
            transforms.append(a)
            # (1) it is the augmentation its points and boxes went through: the original box centres
            # map onto the augmented ones (ObjectRangeFilter may have dropped some of them)
            original = base.get_data_info(row)["ann_info"]["gt_bboxes_3d"].tensor[:, :2].double().numpy()
            moved = (a[:2, :2] @ original.T + a[:2, 2:]).T  # [n, 2]
            augmented = sample.gt_instances_3d.bboxes_3d.tensor[:, :2].double().numpy()
            assert len(augmented) and np.abs(augmented[:, None] - moved[None]).max(-1).min(1).max() < 1e-3
            # (2) the map the distiller used is the cache of this row warped by exactly that transform
            cached = torch.from_numpy(store.read_spatial("pts_neck", [row])).float()  # [1, C, h, w]
            expected, valid = warp_bev(cached, torch.as_tensor(a[None], dtype=torch.float32), bev_range)
            torch.testing.assert_close(step["teacher"][k:k + 1], expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(step["valid"][k:k + 1], valid, rtol=0, atol=0)
    assert any(not np.allclose(a, np.eye(3)) for a in transforms)  # augmentation did happen
    assert len({tuple(np.round(a, 6).ravel()) for a in transforms}) == len(transforms)  # each sample its own


UNKNOWN = dict(type="BevcacheTestRandomNudge")


@pytest.mark.parametrize("kind", ["ObjectSample", "unknown"])
def test_a_transform_the_warp_cannot_express_is_refused(kind, data_root, spatial_store, tmp_path):
    _register()
    step = object_sample(data_root, Config.fromfile(str(CONFIGS / "tiny_student_crd.py")).class_names) \
        if kind == "ObjectSample" else UNKNOWN
    runner = Runner.from_cfg(spatial_config(data_root, spatial_store, tmp_path, extra_steps=(step,)))
    words = (r"ObjectSample \(pastes database objects" if kind == "ObjectSample"
             else r"BevcacheTestRandomNudge \(a random transform bevcache does not know how to warp\)")
    with pytest.raises(ConfigError, match=r"augmentation='warp' cannot express.*" + words + r".*ignore_non_warpable=True"):
        runner.train()


def test_ignore_non_warpable_trains_with_a_warning(data_root, spatial_store, tmp_path):
    _register()
    runner, rec = train(spatial_config(data_root, spatial_store, tmp_path, iters=1, extra_steps=(UNKNOWN,),
                                       ignore_non_warpable=True))
    assert rec.losses[0]["loss_spatial_pts_neck"] > 0
    assert "loss_spatial_nce_pts_neck" not in rec.losses[0]  # contrastive=False by default
    assert "warping cached maps although ['BevcacheTestRandomNudge']" in _log(runner)


def test_without_teacher_rows_dataset_the_hook_adds_it_with_the_same_losses(data_root, spatial_store, tmp_path):
    from bevcache.loading import TeacherRowsDataset

    wrapped_runner, wrapped = train(spatial_config(data_root, spatial_store, tmp_path / "wrapped"))
    plain_runner, plain = train(spatial_config(data_root, spatial_store, tmp_path / "plain", rows_wrapper=False))
    rows = plain_runner.train_dataloader.dataset
    assert isinstance(rows, TeacherRowsDataset) and rows.spatial == ["pts_neck"] and rows.cache == spatial_store
    assert rows.prepare is not None and rows.prepare.warp  # the workers warp and weigh the maps
    assert [r["loss_spatial_pts_neck"] for r in plain.losses] == pytest.approx(
        [r["loss_spatial_pts_neck"] for r in wrapped.losses], rel=1e-6)


def test_a_wrapper_reading_the_wrong_rows_is_refused_with_how_to(data_root, spatial_store, tmp_path):
    cfg = spatial_config(data_root, spatial_store, tmp_path, rows_wrapper=False)
    cfg.train_dataloader.dataset = dict(type="TeacherRowsDataset", dataset=cfg.train_dataloader.dataset,
                                        cache=spatial_store, pooled=["pts_neck"])
    runner = Runner.from_cfg(cfg)
    with pytest.raises(ConfigError, match=r"TeacherRowsDataset reads \[\] / \['pts_neck'\].*needs \['pts_neck'\] / "
                                          r"\[\].*remove the wrapper \(DistillationHook adds the right one\)"):
        runner.train()


def test_two_workers_train_past_the_loaders_prefetch(data_root, spatial_store, tmp_path):
    """DistillationHook restarts the loader an IterBasedTrainLoop started before any hook; the
    InfiniteSampler's index generator is renewed, so training runs past the first prefetch."""
    _, rec = train(spatial_config(data_root, spatial_store, tmp_path, iters=6, workers=2))
    assert len(rec.losses) == 6


# ---------------------------------------------------------------------------------------------
# Targets prepared by the loader workers


BEV_RANGE = (-25.6, -25.6, 25.6, 25.6)  # the student's point_cloud_range in the BEV plane (the distiller's default)


def main_process_targets(model, samples: list, store) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: the distiller's computation before the workers prepared anything, on the
    batch: the cached float16 maps stacked and warped together, one foreground heatmap per sample."""
    from bevcache.warp import gaussian_foreground

    c = model.spatial_cfg
    maps = torch.from_numpy(store.read_spatial("pts_neck", [int(s.metainfo["sample_idx"]) for s in samples])).float()
    transforms = torch.as_tensor(np.stack([bev_transform(s.metainfo, model.augmentation_order) for s in samples]),
                                 dtype=torch.float32)
    warped, valid = warp_bev(maps, transforms, c["bev_range"])
    fg = torch.stack([gaussian_foreground(s.gt_instances_3d.bboxes_3d, c["bev_range"], maps.shape[-2:],
                                          min_radius=c["min_radius"], overlap=c["overlap"]) for s in samples])
    return warped, valid, fg


class LossWitness(Hook):
    """Per step: the samples, the spatial loss's inputs and output, and a copy of the loss module
    as it was (its adapter moves after the step)."""

    def __init__(self):
        self.steps: list[dict] = []

    def before_train(self, runner) -> None:
        import copy

        def samples_in(module, args, kwargs):
            if kwargs.get("mode") == "loss":
                self.steps.append({"samples": kwargs["data_samples"]})

        def loss_out(module, args, output):
            self.steps[-1].update(args=[a if a is None else a.detach().clone() for a in args],
                                  feat=output["feat"].detach().clone(), module=copy.deepcopy(module))

        runner.model.register_forward_pre_hook(samples_in, with_kwargs=True)
        runner.model.spatial_loss["pts_neck"].register_forward_hook(loss_out)


def test_worker_prepared_batches_give_the_main_process_targets_and_loss(data_root, spatial_store, tmp_path):
    witness = LossWitness()
    runner, rec = train(spatial_config(data_root, spatial_store, tmp_path, workers=2,
                                       prepare=dict(bev_range=BEV_RANGE, warp=True)), witness)
    assert "computed on the main process" not in _log(runner)
    store = open_store(spatial_store)
    assert len(witness.steps) == 2
    for step, losses in zip(witness.steps, rec.losses, strict=True):
        student, teacher, valid, fg = step["args"]
        ref_teacher, ref_valid, ref_fg = main_process_targets(runner.model, step["samples"], store)
        assert torch.equal(teacher, ref_teacher) and torch.equal(valid, ref_valid) and torch.equal(fg, ref_fg)
        assert ref_fg.amax((1, 2)).min() == 1 and ref_valid.mean() < 1  # boxes drawn; rotated maps lose corners
        with torch.no_grad():  # the loss the main process computed from its own targets (autograd formulation)
            reference = step["module"]._forward_autograd(student, ref_teacher, ref_valid, ref_fg)["feat"]
        torch.testing.assert_close(step["feat"], reference, rtol=1e-6, atol=0)
        assert losses["loss_spatial_pts_neck"] == pytest.approx(float(reference), rel=1e-6)


class PrepareRows(Hook):
    """Once DistillationHook has checked the data (the warp's order is known), hand the distiller's
    settings to TeacherRowsDataset (prepare=True), or take any away (False). Registered after it;
    no loader workers here, so nothing to restart."""

    def __init__(self, prepare: bool):
        self.prepare = prepare

    def before_train(self, runner) -> None:
        from bevcache.loading import find_rows_dataset

        rows = find_rows_dataset(runner.train_dataloader.dataset)
        rows.prepare_spatial(runner.model.spatial_loader_settings() if self.prepare else None)


def test_prepared_and_main_process_runs_have_the_same_losses(data_root, spatial_store, tmp_path):
    main_runner, main = train(spatial_config(data_root, spatial_store, tmp_path / "main", iters=3, contrastive=True,
                                             rows_wrapper=False), PrepareRows(False))
    assert "computed on the main process" in _log(main_runner)
    prepared_runner, prepared = train(spatial_config(data_root, spatial_store, tmp_path / "prepared", iters=3,
                                                     contrastive=True, rows_wrapper=False), PrepareRows(True))
    assert "computed on the main process" not in _log(prepared_runner)
    assert prepared_runner.train_dataloader.dataset.prepare.order == prepared_runner.model.augmentation_order
    assert len(main.losses) == len(prepared.losses) == 3
    for a, b in zip(main.losses, prepared.losses, strict=True):
        assert set(a) == set(b) and "loss_spatial_nce_pts_neck" in a
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key


def test_maps_prepared_with_other_settings_are_refused(data_root, spatial_store, tmp_path):
    other = (-20.0, -25.6, 25.6, 25.6)
    runner = Runner.from_cfg(spatial_config(data_root, spatial_store, tmp_path, iters=1,
                                            prepare=dict(bev_range=other, warp=True)))
    with pytest.raises(ConfigError, match=r"the loader prepared the teacher maps with settings \(\(-20\.0, .*but this "
                                          r"distiller's are \(\(-25\.6, "):
        runner.train()
