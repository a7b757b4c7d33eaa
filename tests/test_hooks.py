"""The mmengine hooks of a distillation run: what they change reaches the loader workers, the guard
installs and restores its own handlers, the export hook writes a student that loads strictly."""

from __future__ import annotations

import signal

from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner, load_checkpoint

from .conftest import CONFIGS, iteration_run

AUGMENTED = [
    dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=4),
    dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
    dict(type="GlobalRotScaleTrans", rot_range=[-0.3, 0.3], scale_ratio_range=[0.95, 1.05]),
    dict(type="RandomFlip3D", flip_ratio_bev_horizontal=0.5),
    dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"],
         meta_keys=("sample_idx", "token", "transformation_3d_flow")),
]


class Seen(Hook):
    """Records the augmentation each training sample went through (its metainfo, set in the worker)."""

    def __init__(self):
        self.flows = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.flows += [tuple(s.metainfo.get("transformation_3d_flow", ())) for s in data_batch["data_samples"]]


def test_dropped_transforms_never_reach_already_forked_persistent_workers(data_root, fp32_store, tmp_path):
    """mmengine's IterBasedTrainLoop forks its workers when built, before before_train: the hook restarts them."""
    from bevcache.data import set_data_root

    cfg = Config.fromfile(str(CONFIGS / "tiny_student_crd.py"))
    set_data_root(cfg, str(data_root))
    cfg.model.update(cache=fp32_store, augmentation="drop")
    cfg.train_dataloader.dataset.pipeline = AUGMENTED
    cfg = iteration_run(cfg, work_dir=tmp_path, iters=3, batch_size=2, workers=2, seed=3)
    cfg.train_dataloader.persistent_workers = True
    before = signal.getsignal(signal.SIGINT)
    runner = Runner.from_cfg(cfg)
    seen = Seen()
    runner.register_hook(seen)
    runner.train()
    assert len(seen.flows) == 6 and all(flow == () for flow in seen.flows), seen.flows  # no R/S/HF recorded
    assert signal.getsignal(signal.SIGINT) is before  # TrainGuardHook (from the config) restored it
    from bevcache.teacher import build_model

    student = build_model(cfg.model.student)
    load_checkpoint(student, str(tmp_path / "student_weights.pth"), map_location="cpu", strict=True)
