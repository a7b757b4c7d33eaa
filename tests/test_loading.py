"""TeacherRowsDataset (bevcache/loading.py): loader workers read each sample's own teacher rows
lazily from the store (one store handle per worker, never the whole table), in forked and spawned
workers, under augmentation replay too; with `prepare` settings the workers warp each map into its
sample's augmented frame and draw its foreground exactly as the main process did on the batch; the
distiller logs whether its pooled table is held in memory or read per sample, and both give the
same CRD losses."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.dataset import pseudo_collate
from torch.utils.data import DataLoader

from bevcache.errors import ConfigError
from bevcache.loading import (
    PREP_META,
    SpatialPrep,
    TeacherRowsDataset,
    fg_field,
    find_rows_dataset,
    map_field,
    valid_field,
    vec_field,
)
from bevcache.replay import VIEW_META, ReplayViewsDataset
from bevcache.store import FeatureStore, open_store

from .conftest import CONFIGS, SPATIAL_GRID, SPATIAL_VIEWS, tiny_cfg

GRID, VIEWS = SPATIAL_GRID, SPATIAL_VIEWS


def base_dataset(data_root: Path, pipeline: str = "train_pipeline"):
    from bevcache.data import build_base_dataset

    cfg = tiny_cfg("tiny_teacher.py", data_root)
    return build_base_dataset(cfg, "train", pipeline=list(cfg[pipeline]))


class WhoRead(TeacherRowsDataset):
    """Also tags each sample with the process that read its rows and that process's store handle."""

    def __getitem__(self, index):
        packed = super().__getitem__(index)
        packed["data_samples"].set_metainfo({"read_pid": os.getpid(), "store_handle": id(self._store)})
        return packed


def _refuse_whole_table(*args, **kwargs):
    raise AssertionError("a loader worker read a whole teacher table")


def load_all(dataset, *, workers: int, start: str = "fork", batch_size: int = 2) -> list:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=pseudo_collate,
                        multiprocessing_context=start if workers else None, shuffle=False)
    return [sample for batch in loader for sample in batch["data_samples"]]


def test_two_workers_attach_each_samples_own_map_from_a_store_opened_per_worker(data_root, spatial_store,
                                                                               monkeypatch):
    monkeypatch.setattr(FeatureStore, "read_table", _refuse_whole_table)  # forked workers inherit it
    rows = WhoRead(base_dataset(data_root), spatial_store, spatial=["pts_neck"], pooled=["pts_neck"])
    samples = load_all(rows, workers=2)
    store = open_store(spatial_store)
    assert sorted(int(s.metainfo["sample_idx"]) for s in samples) == list(range(12))
    for s in samples:
        row = int(s.metainfo["sample_idx"])
        got = getattr(s, map_field("pts_neck"))
        assert got.dtype == torch.float16 and tuple(got.shape) == (512, GRID, GRID)
        np.testing.assert_array_equal(got.numpy(), store.read_spatial("pts_neck", [row])[0])
        np.testing.assert_array_equal(getattr(s, vec_field("pts_neck")).numpy(), store.read_rows("pts_neck", [row])[0])
    handles: dict[int, set] = {}
    for s in samples:
        handles.setdefault(s.metainfo["read_pid"], set()).add(s.metainfo["store_handle"])
    assert len(handles) == 2 and os.getpid() not in handles  # read in the two workers, not here
    assert all(len(h) == 1 for h in handles.values())  # one store handle per worker, reused
    assert rows._store is None  # the main process never opened it
    # the dataset a worker receives holds no store and no table
    assert "_store" not in {k for k, v in rows.__getstate__().items() if v is not None}


def test_replayed_views_get_the_map_of_the_view_they_show(data_root, spatial_store):
    replay = ReplayViewsDataset(base_dataset(data_root, "augmented_train_pipeline"), num_views=VIEWS)
    replay.bind(num_views=VIEWS, recorded=open_store(spatial_store).attrs.get("augmentation"), where=spatial_store)
    rows = TeacherRowsDataset(replay, spatial_store, spatial=["pts_neck"])
    assert find_rows_dataset(rows) is rows
    store = open_store(spatial_store)
    seen = set()
    for epoch in (0, 1):
        replay.set_epoch(epoch)  # shared memory: the workers see it
        for s in load_all(rows, workers=2):
            row, view = int(s.metainfo["sample_idx"]), int(s.metainfo[VIEW_META])
            assert 1 <= view <= VIEWS
            seen.add(view)
            np.testing.assert_array_equal(getattr(s, map_field("pts_neck")).numpy(),
                                          store.read_spatial("pts_neck", [row], views=[view])[0])
            assert not np.array_equal(getattr(s, map_field("pts_neck")).numpy(),  # not the un-augmented map
                                      store.read_spatial("pts_neck", [row])[0])
    assert seen == set(range(1, VIEWS + 1))


def test_a_spawned_worker_reopens_the_store_and_reads_the_same_maps(data_root, spatial_store):
    rows = WhoRead(base_dataset(data_root), spatial_store, spatial=["pts_neck"])
    rows.__getitem__(0)  # the parent has a handle (and used zarr's event loop): it must not travel
    assert rows._store is not None
    samples = load_all(rows, workers=1, start="spawn", batch_size=4)
    store = open_store(spatial_store)
    assert len(samples) == 12 and {s.metainfo["read_pid"] for s in samples} - {os.getpid()}
    assert len({s.metainfo["store_handle"] for s in samples}) == 1
    for s in samples:
        np.testing.assert_array_equal(getattr(s, map_field("pts_neck")).numpy(),
                                      store.read_spatial("pts_neck", [int(s.metainfo["sample_idx"])])[0])


BEV_RANGE = (-25.6, -25.6, 25.6, 25.6)  # configs/_base_/synthetic_nus.py's point_cloud_range in the BEV plane


def batch_targets(samples: list, maps: torch.Tensor, prep: SpatialPrep):
    """The reference: what the distiller's main process computes on a batch (warp_bev of the
    stacked float16 maps, one gaussian_foreground per sample)."""
    from bevcache.warp import bev_transform, gaussian_foreground, warp_bev

    h, w = maps.shape[-2:]
    transforms = torch.as_tensor(np.stack([bev_transform(s.metainfo, prep.order) for s in samples]),
                                 dtype=torch.float32)
    warped, valid = warp_bev(maps.float(), transforms, prep.bev_range)
    fg = torch.stack([gaussian_foreground(s.gt_instances_3d.bboxes_3d, prep.bev_range, (h, w),
                                          min_radius=prep.min_radius, overlap=prep.overlap) for s in samples])
    return warped, valid, fg


def test_workers_warp_and_weigh_each_sample_exactly_as_the_main_process_did_on_the_batch(data_root, spatial_store):
    from bevcache.warp import augmentation_order

    base = base_dataset(data_root, "augmented_train_pipeline")
    rows = TeacherRowsDataset(base, spatial_store, spatial=["pts_neck"],
                              prepare=dict(bev_range=BEV_RANGE, warp=True, min_radius=2, overlap=0.1))
    # no order given: the wrapped pipeline's own (what the distiller reads at before_train)
    assert rows.prepare is not None and rows.prepare.order == augmentation_order(
        [type(t).__name__ for t in base.pipeline.transforms])
    samples = load_all(rows, workers=2, batch_size=4)
    store = open_store(spatial_store)
    assert len(samples) == 12
    raw = torch.from_numpy(store.read_spatial("pts_neck", [int(s.metainfo["sample_idx"]) for s in samples]))
    warped, valid, fg = batch_targets(samples, raw, rows.prepare)
    moved = 0
    for k, s in enumerate(samples):
        assert s.metainfo[PREP_META] == rows.prepare.key()
        got = getattr(s, map_field("pts_neck"))
        assert got.dtype == torch.float32 and tuple(got.shape) == (512, GRID, GRID)
        assert torch.equal(got, warped[k]) and torch.equal(getattr(s, valid_field("pts_neck")), valid[k])
        assert torch.equal(getattr(s, fg_field("pts_neck")), fg[k]) and fg[k].max() == 1  # its boxes are drawn
        moved += not torch.equal(got, raw[k].float())
    assert moved >= 10  # the augmentation moved (almost) every map; the reference followed each one


def test_without_warp_the_workers_attach_the_read_map_and_its_foreground(data_root, spatial_store):
    rows = TeacherRowsDataset(base_dataset(data_root), spatial_store, spatial=["pts_neck"])
    rows.prepare_spatial(dict(bev_range=BEV_RANGE, warp=False, order=("RandomFlip3D",)))
    assert rows.prepare is not None and rows.prepare.key()[2] is None  # the order means nothing without a warp
    samples = load_all(rows, workers=1)
    store = open_store(spatial_store)
    for s in samples:
        row = int(s.metainfo["sample_idx"])
        got = getattr(s, map_field("pts_neck"))
        assert got.dtype == torch.float16 and torch.equal(got, torch.from_numpy(store.read_spatial("pts_neck", [row])[0]))
        assert valid_field("pts_neck") not in s and fg_field("pts_neck") in s
    rows.prepare_spatial(None)
    assert PREP_META not in rows[0]["data_samples"].metainfo and fg_field("pts_neck") not in rows[0]["data_samples"]


def test_prepare_settings_are_checked():
    with pytest.raises(ConfigError, match="prepare must be a dict with bev_range and warp"):
        SpatialPrep.of(dict(bev_range=BEV_RANGE, warp=True, radius=2))
    with pytest.raises(ConfigError, match="prepare must be a dict"):
        SpatialPrep.of(dict(warp=True))
    assert SpatialPrep.of(dict(bev_range=[-1, -2, 3, 4], warp=False)).bev_range == (-1.0, -2.0, 3.0, 4.0)


# ---------------------------------------------------------------------------------------------
# The distiller's choice: pooled table in memory, or read per sample by the workers


def _crd_config(data_root: Path, store: str, work_dir: Path):
    from mmengine.config import Config

    from bevcache.data import set_data_root

    from .conftest import iteration_run

    cfg = Config.fromfile(str(CONFIGS / "tiny_student_crd.py"))
    set_data_root(cfg, str(data_root))
    cfg.model.cache = store
    cfg.model.augmentation = "drop"
    cfg = iteration_run(cfg, work_dir=work_dir, iters=1, batch_size=2, seed=5)
    return cfg


def _losses(cfg) -> tuple[object, list[dict]]:
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class Losses(Hook):
        def __init__(self):
            self.losses = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.losses.append({k: float(v) for k, v in outputs.items()})

    runner = Runner.from_cfg(cfg)
    rec = Losses()
    runner.register_hook(rec)
    runner.train()
    return runner, rec.losses


def _log(runner) -> str:
    return (Path(runner.log_dir) / f"{Path(runner.log_dir).name}.log").read_text()


def test_the_distiller_logs_its_choice_and_lazy_pooled_rows_give_the_same_losses(data_root, spatial_store, tmp_path,
                                                                               monkeypatch):
    import bevcache.loading

    memory_run, in_memory = _losses(_crd_config(data_root, spatial_store, tmp_path / "memory"))
    assert "held in memory on the training device" in _log(memory_run)
    assert hasattr(memory_run.model, "teacher_table__pts_neck") and not memory_run.model.lazy_pooled

    monkeypatch.setattr(bevcache.loading, "POOLED_IN_MEMORY_BYTES", 0)  # every table counts as too large
    monkeypatch.setattr(FeatureStore, "read_table", _refuse_whole_table)
    lazy_run, lazy = _losses(_crd_config(data_root, spatial_store, tmp_path / "lazy"))
    rows = lazy_run.train_dataloader.dataset  # added by DistillationHook: the config has no wrapper
    assert isinstance(rows, TeacherRowsDataset) and rows.pooled == ["pts_neck"] and rows.spatial == []
    assert "read per sample by the loader workers (TeacherRowsDataset)" in _log(lazy_run)
    assert lazy_run.model.lazy_pooled and not hasattr(lazy_run.model, "teacher_table__pts_neck")
    assert [r["loss_crd_pts_neck"] for r in lazy] == pytest.approx([r["loss_crd_pts_neck"] for r in in_memory],
                                                                    rel=1e-6)

