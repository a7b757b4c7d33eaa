"""CRDDistiller is self-sufficient: every check runs through plain `Runner.from_cfg` on the config form
(configs/tiny_student_crd.py), with no help from `bevcache train`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from mmengine.config import Config
from mmengine.hooks import Hook
from mmengine.runner import Runner

from bevcache.errors import ConfigError, StoreMismatch

from .conftest import CONFIGS, iteration_run

CRD_CONFIG = CONFIGS / "tiny_student_crd.py"


class Losses(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append({k: float(v) for k, v in outputs.items()})


def crd_config(data_root: Path, store: str, work_dir: Path, *, iters: int = 2, **model) -> Config:
    """The config form pointed at a data root and store, as a short iteration-based run."""
    from bevcache.data import set_data_root

    cfg = Config.fromfile(str(CRD_CONFIG))
    set_data_root(cfg, str(data_root))
    cfg.model.cache = store
    cfg.model.update(model)
    return iteration_run(cfg, work_dir=work_dir, iters=iters, batch_size=2, seed=3)


def train(cfg: Config) -> tuple[Runner, Losses]:
    runner = Runner.from_cfg(cfg)
    rec = Losses()
    runner.register_hook(rec)
    runner.train()
    return runner, rec


def test_the_config_form_trains_and_takes_everything_from_the_store(data_root, fp32_store, tmp_path):
    runner, rec = train(crd_config(data_root, fp32_store, tmp_path))
    model = runner.model
    crd = model.crd["pts_neck"]
    assert model.num_data == 12 and crd.num_data == 12  # from the store, not a config number
    assert crd.nce_k == 11  # 16384 clamped below n_data
    assert crd.embed_t.in_features == 512 and crd.embed_s.in_features == 256  # widths: store, first batch
    assert len(rec.losses) == 2 and rec.losses[0]["loss_crd_pts_neck"] > 0
    assert (tmp_path / "student_weights.pth").is_file()  # StudentExportHook


@pytest.mark.parametrize("key, value, message", [
    ("num_data", 13, "num_data=13 in the config contradicts the store"),
    ("teacher_dims", {"pts_neck": 256}, "teacher_dims['pts_neck']=256 in the config contradicts the store"),
    ("pooling", "max", "pooling['pts_neck']='max' in the config contradicts the store"),
])
def test_values_contradicting_the_store_are_refused_naming_both(key, value, message, data_root, fp32_store, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        Runner.from_cfg(crd_config(data_root, fp32_store, tmp_path, **{key: value}))
    assert fp32_store in str(info.value)


def test_nce_k_is_clamped_with_a_warning(data_root, fp32_store, tmp_path, caplog):
    from mmengine.logging import MMLogger

    MMLogger.get_instance("bevcache-test")  # a current logger for print_log
    with caplog.at_level(logging.WARNING):
        runner = Runner.from_cfg(crd_config(data_root, fp32_store, tmp_path, nce_k=100))
    assert runner.model.crd["pts_neck"].nce_k == 11


def test_training_without_the_distillation_hook_is_refused(data_root, fp32_store, tmp_path):
    cfg = crd_config(data_root, fp32_store, tmp_path)
    cfg.custom_hooks = []
    with pytest.raises(ConfigError, match="DistillationHook"):
        train(cfg)


def test_another_dataset_is_refused_before_the_first_step(other_data_root, fp32_store, tmp_path):
    with pytest.raises(StoreMismatch, match="not the dataset the store"):
        train(crd_config(other_data_root, fp32_store, tmp_path))


def test_samples_without_a_token_get_it_from_the_hook(data_root, fp32_store, tmp_path):
    """mmdet3d's default meta keys lack 'token': DistillationHook adds it to the built Pack3DDetInputs
    (whatever launched the run), so every sample is still looked up and checked by its token."""
    cfg = crd_config(data_root, fp32_store, tmp_path)
    cfg.train_dataloader.dataset.pipeline[-1].pop("meta_keys")
    runner = Runner.from_cfg(cfg)
    tokens = []

    class Tokens(Hook):
        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            tokens.extend(s.metainfo["token"] for s in data_batch["data_samples"])

    runner.register_hook(Tokens())
    runner.train()
    assert len(tokens) == 4 and all(isinstance(t, str) and t for t in tokens)
    assert "token" in runner.train_dataloader.dataset.pipeline.transforms[-1].meta_keys


def test_a_pipeline_without_pack3ddetinputs_is_refused(data_root, fp32_store, tmp_path):
    cfg = crd_config(data_root, fp32_store, tmp_path)
    cfg.train_dataloader.dataset.pipeline[-1] = dict(type="PointShuffle")
    with pytest.raises(ConfigError, match="no Pack3DDetInputs"):
        train(cfg)


AUGMENTED = [
    dict(type="LoadPointsFromFile", coord_type="LIDAR", load_dim=5, use_dim=4),
    dict(type="LoadAnnotations3D", with_bbox_3d=True, with_label_3d=True),
    dict(type="GlobalRotScaleTrans", rot_range=[-0.3, 0.3], scale_ratio_range=[0.95, 1.05]),
    dict(type="RandomFlip3D", flip_ratio_bev_horizontal=0.5),
    dict(type="Pack3DDetInputs", keys=["points", "gt_bboxes_3d", "gt_labels_3d"], meta_keys=("sample_idx", "token")),
]


@pytest.mark.parametrize("policy", ["drop", "keep"])
def test_random_transforms_follow_the_policy(policy, data_root, fp32_store, tmp_path):
    cfg = crd_config(data_root, fp32_store, tmp_path, augmentation=policy)
    cfg.train_dataloader.dataset.pipeline = AUGMENTED
    runner, _ = train(cfg)
    names = [type(t).__name__ for t in runner.train_dataloader.dataset.pipeline.transforms]
    kept = {"GlobalRotScaleTrans", "RandomFlip3D"} <= set(names)
    assert kept == (policy == "keep")
    log = (Path(runner.log_dir) / f"{Path(runner.log_dir).name}.log").read_text()
    assert ("DROPPED the random train transforms" in log) == (policy == "drop")
    assert "GlobalRotScaleTrans" in log and "RandomFlip3D" in log


def test_replay_without_its_wrapper_or_views_is_refused(data_root, fp32_store, tmp_path):
    from bevcache.errors import StoreError

    with pytest.raises(StoreError, match="needs a store with augmented views"):
        Runner.from_cfg(crd_config(data_root, fp32_store, tmp_path, augmentation="replay"))


def test_online_reference_needs_and_checks_num_data(data_root, teacher_ckpt, tmp_path):
    from bevcache.runtime import load_config

    teacher = load_config(CONFIGS / "tiny_teacher.py").model.to_dict()
    cfg = crd_config(data_root, "unused", tmp_path)
    cfg.model.pop("cache")
    cfg.model.update(teacher=teacher, teacher_checkpoint=teacher_ckpt)
    with pytest.raises(ConfigError, match="needs num_data"):
        Runner.from_cfg(cfg)
    cfg.model.num_data = 11
    with pytest.raises(StoreMismatch, match="12 samples but the distiller's num_data has 11"):
        train(cfg)


def test_custom_imports_registers_every_component():
    """`custom_imports=dict(imports=['bevcache'])` is all a config needs: in a fresh process."""
    import subprocess
    import sys

    code = ("from mmengine.config import Config; from mmdet3d.registry import MODELS, DATASETS, HOOKS, METRICS; "
            f"Config.fromfile({str(CRD_CONFIG)!r}); "
            "print(all(r.get(n) is not None for r, n in [(MODELS, 'CRDDistiller'), (DATASETS, 'ReplayViewsDataset'), "
            "(DATASETS, 'TeacherRowsDataset'), (HOOKS, 'DistillationHook'), (HOOKS, 'StudentExportHook'), "
            "(HOOKS, 'TrainGuardHook'), (METRICS, 'SafeNuScenesMetric')]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-1] == "True", result.stderr[-2000:]


def test_the_readme_custom_imports_form_adds_to_the_base_configs_imports(tmp_path):
    """`imports=_base_.custom_imports.imports + ['bevcache']` keeps what the base config imports
    (BEVFusion's project, here the fused detector's module) instead of replacing it."""
    child = tmp_path / "student_with_bevcache.py"
    child.write_text(f"_base_ = [{str(CONFIGS / 'tiny_fused_teacher.py')!r}]\n"
                     "custom_imports = dict(imports=_base_.custom_imports.imports + ['bevcache'], "
                     "allow_failed_imports=False)\n")
    imports = Config.fromfile(str(child)).custom_imports.imports
    assert imports == ["bevcache.evaluation", "bevcache.fusion", "bevcache"]


def test_a_student_whose_module_was_never_imported_is_named_with_the_fix(data_root, fp32_store, tmp_path):
    cfg = crd_config(data_root, fp32_store, tmp_path)
    cfg.model.student.type = "BEVFusion"  # as when `imports=['bevcache']` replaced the project's import list
    with pytest.raises(ConfigError, match=r"'BEVFusion' is not registered .*custom_imports = dict\(imports="):
        Runner.from_cfg(cfg)


def test_the_replay_config_form_binds_the_store_and_refuses_without_views(data_root, teacher_ckpt, fp32_store,
                                                                         tmp_path):
    from bevcache.data import set_data_root
    from bevcache.errors import StoreError
    from bevcache.extract import ExtractOptions, extract
    from bevcache.replay import find_replay_dataset

    views = tmp_path / "views.zarr"
    extract(ExtractOptions(config=str(CONFIGS / "tiny_teacher.py"), checkpoint=teacher_ckpt, out=str(views),
                           data_root=str(data_root), batch_size=4, num_workers=0, chunk_rows=4, views=2,
                           progress=False))
    cfg = Config.fromfile(str(CONFIGS / "tiny_student_crd_replay.py"))
    set_data_root(cfg, str(data_root))
    cfg.model.cache = str(views)
    runner, rec = train(iteration_run(cfg, work_dir=tmp_path / "w", iters=2, batch_size=2, seed=3))
    replay = find_replay_dataset(runner.train_dataloader.dataset)
    assert replay.num_views == 2 and len(rec.losses) == 2  # K bound from the store at before_train
    cfg.model.cache = fp32_store  # a store without views
    with pytest.raises(StoreError, match="needs a store with augmented views"):
        Runner.from_cfg(cfg)


def test_online_spatial_only_distillation_records_the_teacher_map(data_root, teacher_ckpt, tmp_path):
    """No CRD layers, one spatial layer, the teacher live on the (augmented) batch."""
    from bevcache.runtime import load_config

    teacher = load_config(CONFIGS / "tiny_teacher.py").model.to_dict()
    cfg = crd_config(data_root, "unused", tmp_path, iters=1)
    cfg.model.pop("cache")
    cfg.model.update(teacher=teacher, teacher_checkpoint=teacher_ckpt, num_data=12, augmentation="keep",
                     spatial=dict(layers=dict(pts_neck="pts_neck"), channels=512, grid=(16, 16)))
    cfg.model.layers = {}  # (ConfigDict.update would merge into the default layers)
    runner, rec = train(cfg)
    assert set(k for k in rec.losses[0] if "spatial" in k or "crd" in k) == {"loss_spatial_pts_neck"}
    assert rec.losses[0]["loss_spatial_pts_neck"] > 0
    assert runner.model.spatial_loss["pts_neck"].adapter.weight.shape[:2] == (512, 256)


def test_spatial_settings_are_checked_before_anything_is_built():
    from bevcache.distiller import check_model_cfg
    from bevcache.errors import SettingError

    check_model_cfg(dict(spatial=dict(normalize=False)))  # raw-feature MSE is a valid choice
    with pytest.raises(SettingError, match="spatial.normalize must be True"):
        check_model_cfg(dict(spatial=dict(normalize="no")))
    with pytest.raises(SettingError, match="spatial.loss must be 'mse' when spatial.normalize=False"):
        check_model_cfg(dict(spatial=dict(normalize=False, loss="cosine")))
