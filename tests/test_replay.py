"""Augmentation replay: seeded views at extraction, the exact same input for the student, equal losses."""

from __future__ import annotations

import copy
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from bevcache.errors import ConfigError, FeatureValueError, StoreError, StoreMismatch
from bevcache.extract import ExtractOptions, extract
from bevcache.replay import (
    DIGEST_META,
    VIEW_META,
    ReplayViewsDataset,
    find_replay_dataset,
    pick_view,
    seeded_rngs,
)
from bevcache.store import LayerSpec, create_store, open_store
from bevcache.train import TrainOptions, build_train_config

from .conftest import CONFIGS, REPO, bevcache_cmd, tiny_cfg
from .test_extract import _run_killed
from .test_train import run, short_run

TEACHER = str(CONFIGS / "tiny_teacher.py")
REPLAY_STUDENT = str(CONFIGS / "tiny_student_replay.py")
VIEWS = 2


def _extract_args(data_root, ckpt, out) -> list[str]:
    return ["extract", "--config", TEACHER, "--checkpoint", ckpt, "--data-root", str(data_root), "--out", str(out),
            "--batch-size", "3", "--num-workers", "0", "--chunk-rows", "4", "--dtype", "float32", "--views", str(VIEWS)]


@pytest.fixture(scope="module")
def views_store(data_root, teacher_ckpt, tmp_path_factory) -> str:  # noqa: F811
    out = tmp_path_factory.mktemp("views") / "features.zarr"
    extract(ExtractOptions(config=TEACHER, checkpoint=teacher_ckpt, out=str(out), data_root=str(data_root),
                           batch_size=3, num_workers=0, chunk_rows=4, dtype="float32", views=VIEWS, progress=False))
    return str(out)


def _train_dataset(cfg):
    """The train dataset as DistillationHook leaves it: the config's, with the wrappers the distiller reads through."""
    from mmdet3d.registry import DATASETS, MODELS

    from bevcache.wiring import add_wrappers, base_pipeline_cfg

    distiller = MODELS.build(cfg.model)
    return add_wrappers(distiller, DATASETS.build(cfg.train_dataloader.dataset),
                        base_pipeline_cfg(cfg.train_dataloader.dataset), seed=(cfg.get("randomness") or {}).get("seed"))


def _points_and_boxes(sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    return sample["inputs"]["points"], sample["data_samples"].gt_instances_3d.bboxes_3d.tensor


# -- seeds and view picking ---------------------------------------------------------------------


def test_seeded_rngs_repeat_inside_and_restore_outside():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected_after = draw()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with seeded_rngs(5):
        first = draw()
    with seeded_rngs(5):
        assert draw() == first
    with seeded_rngs(6):
        assert draw() != first
    assert draw() == expected_after  # the surrounding run's streams did not move


def test_pick_view_shows_every_view_once_per_cycle_in_a_per_sample_order():
    views, samples = 4, 2000
    cycles = [[[pick_view(0, cycle * views + slot, i, views) for slot in range(views)] for i in range(samples)]
              for cycle in range(2)]
    assert all(sorted(order) == [1, 2, 3, 4] for cycle in cycles for order in cycle)  # no repeat within K epochs
    counts = np.bincount([order[0] for order in cycles[0]], minlength=5)
    assert counts[0] == 0 and all(400 <= c <= 600 for c in counts[1:]), counts  # epoch 0: uniform over the views
    assert sum(a != b for a, b in zip(cycles[0], cycles[1], strict=True)) > 0.9 * samples  # a new order per cycle
    assert cycles[0] == [[pick_view(0, slot, i, views) for slot in range(views)] for i in range(samples)]
    other_seed = [pick_view(1, 0, i, views) for i in range(samples)]
    assert sum(a != order[0] for a, order in zip(other_seed, cycles[0], strict=True)) > 0.6 * samples


def test_more_passes_than_views_is_warned_with_the_views_to_extract(views_store, data_root, monkeypatch):
    from types import SimpleNamespace

    from bevcache.hooks import DistillationHook

    dataset = _train_dataset(build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root),
                                                             cache=views_store)))
    find_replay_dataset(dataset).bind(num_views=VIEWS, recorded=None, where=views_store)
    logged = []
    monkeypatch.setattr("mmengine.logging.print_log", lambda msg, **kw: logged.append((msg, kw.get("level"))))
    hook = DistillationHook()
    loader = SimpleNamespace(dataset=dataset)
    for epochs in (VIEWS, VIEWS + 1):  # epoch-based: K epochs show each view once, K + 1 repeat one
        hook._warn_repeated_views(SimpleNamespace(train_dataloader=loader, train_loop=SimpleNamespace(max_epochs=epochs)))
    hook._iters_per_pass = 5  # iteration-based: the passes are counted from the iterations
    hook._warn_repeated_views(SimpleNamespace(train_dataloader=loader, train_loop=SimpleNamespace(max_iters=5 * VIEWS)))
    hook._warn_repeated_views(SimpleNamespace(train_dataloader=loader, train_loop=SimpleNamespace(max_iters=5 * VIEWS + 1)))
    assert len(logged) == 2 and all(level == 30 for _, level in logged), logged
    assert all(f"{VIEWS + 1} passes over the data but {VIEWS} augmented views" in msg for msg, _ in logged)
    assert all(f"--views {VIEWS + 1} or more" in msg for msg, _ in logged)


# -- the store ------------------------------------------------------------------------------------


def test_store_with_views_writes_checks_and_verifies(tmp_path):
    url = str(tmp_path / "s.zarr")
    store = create_store(url, num_samples=5, layers=[LayerSpec("pts_neck", 3, "avg")], dtype="float32",
                         tokens=list("abcde"), sample_idx=list(range(5)), metadata={}, chunk_rows=2, views=2)
    rng = np.random.default_rng(0)
    with pytest.raises(StoreError, match="views"):
        store.write_block(0, {"pts_neck": rng.random((2, 3))})  # views missing
    bad_views = {"pts_neck": np.full((2, 2, 3), np.nan)}
    with pytest.raises(FeatureValueError, match="NaN"):
        store.write_block(0, {"pts_neck": rng.random((2, 3))}, views=bad_views, digests=np.zeros((2, 2)))
    feats, views, digests = rng.random((5, 3)), rng.random((5, 2, 3)), rng.integers(-9, 9, (5, 2))
    for s, e in store.blocks():
        store.write_block(s, {"pts_neck": feats[s:e]}, views={"pts_neck": views[s:e]}, digests=digests[s:e])
    store = open_store(url)
    assert store.num_views == 2 and store.verify() == [] and store.info()["views"] == 2
    np.testing.assert_allclose(store.read_table("pts_neck", views=True).numpy(), views.astype(np.float32))
    np.testing.assert_array_equal(store.read_digests(), digests)
    chunk = Path(url) / "views" / "pts_neck" / "c" / "1" / "0" / "0"
    chunk.unlink()  # rows 2-3 of the views lost
    problems = store.verify()
    assert any("views/pts_neck" in p and "2-3" in p for p in problems), problems
    with pytest.raises(StoreMismatch, match="augmented views per sample: expected 4, found 2"):
        store.check_matches(views=4)


# -- extraction and replay --------------------------------------------------------------------------


def test_view_rows_are_the_teacher_on_the_augmented_input(views_store, data_root, teacher_ckpt):  # noqa: F811
    from mmengine.dataset import pseudo_collate

    from bevcache.extract import _views_dataset, build_teacher, pooled_teacher_features
    from bevcache.features import LayerRecorder

    store = open_store(views_store)
    info = store.info()
    assert info["views"] == VIEWS and info["complete"] and info["augmentation"]["pipeline_sha256"]
    assert "GlobalRotScaleTrans" in str(store.attrs["augmentation"]["pipeline"])
    cfg = tiny_cfg("tiny_teacher.py", data_root)
    model = build_teacher(cfg, teacher_ckpt, torch.device("cpu"))
    views_ds, _ = _views_dataset(cfg, {"split": "train", "views": VIEWS}, store.tokens)
    table, plain = store.read_table("pts_neck", views=True), store.read_table("pts_neck")
    with LayerRecorder(model, ["pts_neck"], stop_early=True) as rec:
        for index, view in ((0, 1), (5, 2), (11, 1)):
            data = model.data_preprocessor(pseudo_collate([views_ds[(index, view)]]), False)
            direct = pooled_teacher_features(model, rec, data, "avg")["pts_neck"][0]
            torch.testing.assert_close(table[index, view - 1], direct, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(table[index, view - 1], plain[index], atol=1e-4)  # augmented: another input


def test_student_replay_sees_bit_identical_points_and_boxes(views_store, data_root):
    from bevcache.extract import _views_dataset

    store = open_store(views_store)
    digests = store.read_digests()
    cfg = build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root), cache=views_store))
    student_ds = _train_dataset(cfg)
    replay = find_replay_dataset(student_ds)
    assert replay is not None and replay.num_views is None  # K comes from the store, via the distiller
    replay.bind(num_views=store.num_views, recorded=store.attrs["augmentation"], where=views_store)
    assert replay.num_views == VIEWS
    teacher_views, _ = _views_dataset(tiny_cfg("tiny_teacher.py", data_root), {"split": "train", "views": VIEWS},
                                      store.tokens)
    seen = set()
    for epoch in (0, 1, 2):
        replay.set_epoch(epoch)
        for index in (0, 3, 7, 11):
            sample = student_ds[index]
            view = sample["data_samples"].metainfo[VIEW_META]
            assert view == pick_view(replay.seed, epoch, index, VIEWS)
            assert sample["data_samples"].metainfo[DIGEST_META] == digests[index, view - 1]
            points, boxes = _points_and_boxes(sample)
            t_points, t_boxes = _points_and_boxes(teacher_views[(index, view)])
            assert torch.equal(points, t_points) and torch.equal(boxes, t_boxes)
            other = _points_and_boxes(teacher_views[(index, 3 - view)])[0]
            assert not (points.shape == other.shape and torch.equal(points, other))  # views really differ
            seen.add((index, view))
    assert len({v for _, v in seen}) == VIEWS


def test_persistent_workers_follow_the_epoch(views_store, data_root):
    from mmengine.dataset import pseudo_collate
    from torch.utils.data import DataLoader

    cfg = build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root), cache=views_store))
    from bevcache.hooks import DistillationHook

    assert {"type": "DistillationHook"} in [dict(h) for h in cfg.custom_hooks]
    dataset = _train_dataset(cfg)
    replay = find_replay_dataset(dataset)
    replay.bind(num_views=VIEWS, recorded=None, where=views_store)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, persistent_workers=True, collate_fn=pseudo_collate)
    hook, runner = DistillationHook(), type("R", (), {"train_dataloader": loader})()
    for epoch in (0, 1):
        runner.epoch = epoch
        hook.before_train_epoch(runner)  # set in the main process, read in the (forked, persistent) workers
        got = [s.metainfo[VIEW_META] for batch in loader for s in batch["data_samples"]]
        assert got == [pick_view(replay.seed, epoch, i, VIEWS) for i in range(len(dataset))]
    hook._iters_per_pass, runner.iter = len(loader), 3 * len(loader) + 1  # iteration-based: passes are epochs
    hook.before_train_iter(runner, 0)
    assert replay.epoch == 3


def test_a_runner_with_persistent_workers_shows_every_view_over_the_epochs(views_store, data_root, tmp_path):
    """Through Runner.from_cfg, which deep-copies the loader config (dataset included) before the
    workers fork: each epoch's views must reach them (they once stayed at epoch 0's views)."""
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    cfg = build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root), cache=views_store,
                                          work_dir=str(tmp_path), max_epochs=VIEWS))
    cfg.train_dataloader.update(num_workers=1, persistent_workers=True, batch_size=4)
    cfg.update(val_cfg=None, val_dataloader=None, val_evaluator=None)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=1000)

    class ViewsPerEpoch(Hook):
        def __init__(self):
            self.views: dict[int, dict[int, int]] = {}

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            for s in data_batch["data_samples"]:
                self.views.setdefault(runner.epoch, {})[s.metainfo["sample_idx"]] = s.metainfo[VIEW_META]

    runner = Runner.from_cfg(cfg)
    rec = ViewsPerEpoch()
    runner.register_hook(rec)
    runner.train()
    replay = find_replay_dataset(runner.train_dataloader.dataset)
    assert sorted(rec.views) == list(range(VIEWS))
    for epoch, views in rec.views.items():
        assert views == {i: pick_view(replay.seed, epoch, i, VIEWS) for i in views}
    assert all(sorted(rec.views[e][i] for e in range(VIEWS)) == list(range(1, VIEWS + 1)) for i in rec.views[0])

def test_cached_replay_training_equals_online_training_on_the_same_augmented_batches(
        views_store, data_root, teacher_ckpt, tmp_path):  # noqa: F811
    cached_runner, cached = run(short_run(build_train_config(TrainOptions(
        student=REPLAY_STUDENT, data_root=str(data_root), cache=views_store)), tmp_path / "cached", 3))
    online_runner, online = run(short_run(build_train_config(TrainOptions(
        student=REPLAY_STUDENT, data_root=str(data_root), teacher_online=TEACHER, teacher_checkpoint=teacher_ckpt,
        distill_options=[f"views={VIEWS}"])), tmp_path / "online", 3))
    assert cached.samples == online.samples
    for a, b in zip(cached.losses, online.losses, strict=True):
        assert a.keys() == b.keys() and "loss_crd_pts_neck" in a
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, cached.losses, online.losses)
    s_cached, s_online = cached_runner.model.student_state_dict(), online_runner.model.student_state_dict()
    for key, value in s_cached.items():
        torch.testing.assert_close(value, s_online[key], rtol=1e-5, atol=1e-6)


def test_a_changed_augmented_input_is_refused_at_the_loss(views_store, data_root):
    from mmdet3d.registry import MODELS
    from mmdet3d.structures import Det3DDataSample

    cfg = build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root), cache=views_store))
    model = MODELS.build(cfg.model)
    token = open_store(views_store).tokens[4]
    sample = Det3DDataSample(metainfo={"sample_idx": 4, "token": token, VIEW_META: 2, DIGEST_META: 12345})
    with pytest.raises(StoreMismatch, match="dataset index 4, view 2"):
        model._checked_views([sample], torch.device("cpu"))


def test_resume_of_a_killed_view_extraction_gives_the_identical_store(views_store, data_root, teacher_ckpt, tmp_path):  # noqa: F811
    out = tmp_path / "killed.zarr"
    args = _extract_args(data_root, teacher_ckpt, out)
    assert _run_killed(args, 1) == -signal.SIGKILL
    partial = open_store(str(out))
    assert 0 < int(partial.complete_mask().sum()) < 12
    result = subprocess.run(bevcache_cmd(*args, "--resume"), cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resumed, ref = open_store(str(out)), open_store(views_store)
    assert resumed.verify() == []
    assert torch.equal(resumed.read_table("pts_neck"), ref.read_table("pts_neck"))
    assert torch.equal(resumed.read_table("pts_neck", views=True), ref.read_table("pts_neck", views=True))
    np.testing.assert_array_equal(resumed.read_digests(), ref.read_digests())
    other = subprocess.run(bevcache_cmd(*args[:-1], "3", "--resume"), cwd=REPO, capture_output=True, text=True)
    assert other.returncode == 1 and "augmented views per sample: expected 3, found 2" in other.stderr


@pytest.mark.parametrize("drop, expected", [("nothing", "GlobalRotScaleTrans: rot_range"),
                                            ("PointShuffle", "PointShuffle removed")])
def test_a_different_student_pipeline_is_refused_naming_the_transform(views_store, data_root, tmp_path, drop, expected):
    from bevcache.runtime import load_config

    pipeline = load_config(REPLAY_STUDENT).to_dict()["train_dataloader"]["dataset"]["pipeline"]
    pipeline = [dict(s, rot_range=[-0.8, 0.8]) if s["type"] == "GlobalRotScaleTrans" else s
                for s in pipeline if s["type"] != drop]
    config = tmp_path / "student.py"
    config.write_text(f"_base_ = [{REPLAY_STUDENT!r}]\ntrain_dataloader = dict(dataset=dict(pipeline={pipeline!r}))\n")
    with pytest.raises(StoreMismatch, match="differs from the one the views") as err:  # at before_train
        run(short_run(build_train_config(TrainOptions(student=str(config), data_root=str(data_root),
                                                      cache=views_store)), tmp_path / "w", 1))
    assert expected in str(err.value)


def test_replay_without_views_is_a_clear_error(data_root, teacher_ckpt, tmp_path):  # noqa: F811
    plain = tmp_path / "plain.zarr"
    extract(ExtractOptions(config=TEACHER, checkpoint=teacher_ckpt, out=str(plain), data_root=str(data_root),
                           batch_size=4, num_workers=0, chunk_rows=4, progress=False))
    from mmengine.runner import Runner

    with pytest.raises(StoreError, match="--views K"):
        Runner.from_cfg(short_run(build_train_config(TrainOptions(
            student=REPLAY_STUDENT, data_root=str(data_root), cache=str(plain), distill_options=["augmentation=replay"])),
            tmp_path / "a", 1))
    with pytest.raises(ConfigError, match="needs views=K"):
        run(short_run(build_train_config(TrainOptions(student=REPLAY_STUDENT, data_root=str(data_root),
                                                      teacher_online=TEACHER, teacher_checkpoint=teacher_ckpt)),
                      tmp_path / "b", 1))
    with pytest.raises(ConfigError, match="num_views >= 1"):
        ReplayViewsDataset(dataset=[], num_views=0, fingerprint="x")


def test_replay_works_inside_cbgs_with_loader_workers(views_store, data_root, tmp_path):
    from bevcache.runtime import load_config

    dataset = load_config(REPLAY_STUDENT).to_dict()["train_dataloader"]["dataset"]
    config = tmp_path / "cbgs_student.py"
    config.write_text(f"_base_ = [{REPLAY_STUDENT!r}]\ntrain_dataloader = dict(dataset=dict(_delete_=True, "
                      f"type='CBGSDataset', dataset={dataset!r}))\n")
    cfg = build_train_config(TrainOptions(student=str(config), data_root=str(data_root), cache=views_store))
    from mmdet3d.datasets import CBGSDataset
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class ViewRecorder(Hook):
        def __init__(self):
            self.views = []

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            self.views += [s.metainfo.get(VIEW_META) for s in data_batch["data_samples"]]

    runner = Runner.from_cfg(short_run(cfg, tmp_path / "run", 2, workers=2, batch_size=3))
    rec = ViewRecorder()
    runner.register_hook(rec)
    runner.train()  # the distiller checks every sample's input digest against the store
    cbgs = runner.train_dataloader.dataset  # DistillationHook put the replay wrapper inside CBGS
    assert isinstance(cbgs, CBGSDataset) and isinstance(cbgs.dataset, ReplayViewsDataset)
    assert len(rec.views) == 6 and set(rec.views) <= {1, 2}  # every sample showed a cached view


# -- ObjectSample: a database sampler with state across calls, replayed from the view seed ------------


def _object_sample_dataset(cfg, data_root):
    from mmdet3d.registry import DATASETS

    from .test_pipeline import augmented_with_object_sample

    return DATASETS.build(dict(copy.deepcopy(cfg.train_dataloader.dataset),
                               pipeline=augmented_with_object_sample(cfg, data_root)))


def _view_digests(dataset, keys) -> list[tuple[tuple[int, int], int, int]]:
    """(key, input digest, number of boxes) of views made in this order, with unseeded calls in between."""
    from bevcache.replay import augmented_sample

    out = []
    for index, view in keys:
        dataset.prepare_data(index)  # an unseeded call: moves the database sampler on, as training would
        packed = augmented_sample(dataset, index, view, "fingerprint")
        out.append(((index, view), packed["data_samples"].metainfo[DIGEST_META],
                    len(packed["data_samples"].gt_instances_3d.labels_3d)))
    return out


def test_object_sample_views_depend_only_on_their_seed(data_root, monkeypatch):
    cfg = tiny_cfg("tiny_teacher.py", data_root)
    keys = [(i, v) for i in (0, 5, 9) for v in (1, 2)]
    forward = _view_digests(_object_sample_dataset(cfg, data_root), keys)
    backward = _view_digests(_object_sample_dataset(cfg, data_root), keys[::-1] + keys)  # another process order
    seen = {}
    for key, digest, _ in forward + backward:
        assert seen.setdefault(key, digest) == digest, key  # bit-identical whatever was sampled before
    assert len(set(seen.values())) == len(keys)  # every view is another input
    base = _object_sample_dataset(cfg, data_root)
    plain = {i: len(base.get_data_info(i)["ann_info"]["gt_labels_3d"]) for i in (0, 5, 9)}
    assert all(n > plain[key[0]] for key, _, n in forward)  # ObjectSample pasted objects into every view

    from bevcache import pipeline

    monkeypatch.setattr(pipeline, "_REPLAY_RESETS", {})  # without the reset the sampler's position leaks in
    forward = _view_digests(_object_sample_dataset(cfg, data_root), keys)
    backward = _view_digests(_object_sample_dataset(cfg, data_root), keys[::-1])
    assert dict((k, d) for k, d, _ in forward) != dict((k, d) for k, d, _ in backward)


def test_a_transform_whose_output_the_seed_does_not_fix_is_refused(data_root, monkeypatch):
    from bevcache import pipeline

    from .test_pipeline import _register, augmented_with_object_sample

    _register()
    cfg = tiny_cfg("tiny_teacher.py", data_root)
    steps = augmented_with_object_sample(cfg, data_root)
    monkeypatch.setattr(pipeline, "_PROBES", {})
    pipeline.check_replayable(steps, cfg.train_dataloader.dataset)  # replayable: no error
    jitter = steps[:3] + [dict(type="BevcacheTestUnseededJitter")] + steps[3:]
    with pytest.raises(ConfigError, match="BevcacheTestUnseededJitter .* gave two different outputs for the same seed"):
        pipeline.check_replayable(jitter, cfg.train_dataloader.dataset)
    monkeypatch.setattr(pipeline, "_REPLAY_RESETS", {})
    monkeypatch.setattr(pipeline, "_PROBES", {})
    with pytest.raises(ConfigError, match=r"ObjectSample \(step 2 ObjectSample .*Remove ObjectSample"):
        pipeline.check_replayable(steps, cfg.train_dataloader.dataset)


def test_the_pipeline_record_is_the_same_before_and_after_building(data_root):
    from mmdet3d.registry import DATASETS

    from bevcache.data import build_base_dataset
    from bevcache.replay import check_same_pipeline, pipeline_record

    from .test_pipeline import augmented_with_object_sample

    cfg = tiny_cfg("tiny_teacher.py", data_root)
    steps = augmented_with_object_sample(cfg, data_root)
    before = pipeline_record(steps)
    build_base_dataset(cfg, "train", pipeline=steps)
    assert "type" not in steps[2]["db_sampler"]  # built from a deep copy
    DATASETS.build(dict(copy.deepcopy(cfg.train_dataloader.dataset), pipeline=steps))
    assert steps[2]["db_sampler"]["type"] == "DataBaseSampler"  # mmdet3d's ObjectSample mutates its config
    assert pipeline_record(steps) == before
    check_same_pipeline(before, steps, where="test")
