"""Stage two on mmengine's Runner: equivalence with online CRD, index plumbing, resume, no teacher in cached mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mmengine.hooks import Hook

from bevcache.errors import ConfigError, StoreMismatch
from bevcache.train import TrainOptions, build_train_config

from .conftest import CONFIGS, REPO, assert_cached_equals_online, iteration_run, tiny_cfg

STUDENT = str(CONFIGS / "tiny_student.py")
TEACHER = str(CONFIGS / "tiny_teacher.py")


class Recorder(Hook):
    """Keeps every iteration's log_vars and the indices/tokens that reached the model."""

    def __init__(self):
        self.losses, self.samples = [], []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append({k: float(v) for k, v in outputs.items()})
        self.samples += [(int(s.metainfo["sample_idx"]), s.metainfo["token"]) for s in data_batch["data_samples"]]


def short_run(cfg, work_dir: Path, iters: int, *, ckpt_interval: int = 1000, batch_size: int = 2, workers: int = 0,
              shuffle: bool = True):
    """A tiny iteration-based run of `cfg` (seed 7, no validation, constant LR)."""
    return iteration_run(cfg, work_dir=work_dir, iters=iters, batch_size=batch_size, workers=workers, seed=7,
                         checkpoint_interval=ckpt_interval, shuffle=shuffle)


def run(cfg):
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    rec = Recorder()
    runner.register_hook(rec)
    runner.train()
    return runner, rec


def _cfg(data_root, **kw):
    return build_train_config(TrainOptions(student=STUDENT, data_root=str(data_root), **kw))


def test_plain_run_has_no_distiller(data_root, tmp_path):
    cfg = _cfg(data_root)
    assert cfg.model.type == "CenterPoint"
    _, rec = run(short_run(cfg, tmp_path, 2))
    assert len(rec.losses) == 2 and not any(k.startswith("loss_crd") for k in rec.losses[0])


def test_cached_training_equals_online_training(data_root, fp32_store, teacher_ckpt, tmp_path):  # noqa: F811
    cached_runner, cached = run(short_run(_cfg(data_root, cache=fp32_store), tmp_path / "cached", 3))
    online_runner, online = run(short_run(_cfg(data_root, teacher_online=TEACHER, teacher_checkpoint=teacher_ckpt),
                                          tmp_path / "online", 3))
    assert cached.samples == online.samples
    assert_cached_equals_online(cached_runner, cached.losses, online_runner, online.losses)
    n_detectors = sum(type(m).__name__ == "CenterPoint" for m in cached_runner.model.modules())
    assert n_detectors == 1  # the student only: no teacher module exists in cached mode


def test_alpha_scales_the_crd_loss(data_root, fp32_store, tmp_path):
    _, one = run(short_run(_cfg(data_root, cache=fp32_store), tmp_path / "a1", 1))
    _, half = run(short_run(_cfg(data_root, cache=fp32_store, distill_options=["alpha=0.5"]), tmp_path / "a05", 1))
    assert half.losses[0]["loss_crd_pts_neck"] == pytest.approx(0.5 * one.losses[0]["loss_crd_pts_neck"], rel=1e-5)


@pytest.mark.parametrize("wrapper", [None, "CBGSDataset", "RepeatDataset"])
def test_index_reaching_the_loss_is_the_dataset_index(data_root, fp32_store, tmp_path, wrapper):
    from bevcache.store import open_store

    cfg = _cfg(data_root, cache=fp32_store)
    if wrapper == "CBGSDataset":
        cfg.train_dataloader.dataset = dict(type="CBGSDataset", dataset=cfg.train_dataloader.dataset)
    elif wrapper == "RepeatDataset":
        cfg.train_dataloader.dataset = dict(type="RepeatDataset", times=2, dataset=cfg.train_dataloader.dataset)
    cfg = short_run(cfg, tmp_path, 4, workers=2, batch_size=3)
    from mmengine.runner import Runner

    runner = Runner.from_cfg(cfg)
    rec = Recorder()
    runner.register_hook(rec)
    seen = []
    crd = runner.model.crd["pts_neck"]
    crd.register_forward_pre_hook(lambda m, args: seen.extend(int(i) for i in args[2]))
    runner.train()
    tokens = open_store(fp32_store).tokens
    assert len(rec.samples) == 12
    assert seen == [i for i, _ in rec.samples]  # the CRD bank rows are the samples' indices
    for index, token in rec.samples:
        assert tokens[index] == token  # ... and those indices are the right rows


def test_wrong_dataset_is_refused(other_data_root, fp32_store, tmp_path):
    with pytest.raises(StoreMismatch, match="dataset"):
        run(short_run(_cfg(other_data_root, cache=fp32_store), tmp_path, 1))


def test_bad_settings_are_refused(data_root, fp32_store):
    from mmengine.runner import Runner

    from bevcache.errors import LayerError, StoreError

    def build(*options):
        return Runner.from_cfg(_cfg(data_root, cache=fp32_store, distill_options=list(options)))

    with pytest.raises(ConfigError, match="alpha"):
        build("alpha=-1")
    with pytest.raises(LayerError, match="pts_nek"):
        build("layers={'pts_nek':'pts_neck'}")
    with pytest.raises(StoreError, match="not in store"):
        build("layers={'pts_neck':'pts_backbone'}")


def test_the_older_form_translates_into_the_config_form(data_root, fp32_store):
    """`distill = dict(...)` becomes model=dict(type='CRDDistiller', student=<the model>, ...) + the hooks:
    one code path behind both forms; what the store decides is left to the distiller."""
    cfg = _cfg(data_root, cache=fp32_store, distill_options=["alpha=0.5"])
    assert cfg.model.type == "CRDDistiller" and cfg.model.student.type == "CenterPoint"
    assert cfg.model.cache == fp32_store and cfg.model.alpha == 0.5 and "num_data" not in cfg.model
    assert {"DistillationHook", "StudentExportHook"} <= {h["type"] for h in cfg.custom_hooks}
    assert "distill" not in cfg


def test_resume_mid_run_reproduces_the_next_losses(data_root, fp32_store, tmp_path):
    _, full = run(short_run(_cfg(data_root, cache=fp32_store), tmp_path / "full", 4))
    run(short_run(_cfg(data_root, cache=fp32_store), tmp_path / "part", 2, ckpt_interval=2))
    ckpt = tmp_path / "part" / "iter_2.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]  # mmengine's types allow-listed
    assert "crd.pts_neck.memory_s" in state and "crd.pts_neck.z_s" in state
    runner, resumed = run(short_run(_cfg(data_root, cache=fp32_store, resume=str(ckpt)), tmp_path / "part", 4))
    assert len(resumed.losses) == 2
    for a, b in zip(full.losses[2:], resumed.losses, strict=True):
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (key, full.losses, resumed.losses)


def test_export_student_loads_into_the_plain_student(data_root, fp32_store, tmp_path):
    from mmdet3d.registry import MODELS
    from mmengine.runner import load_checkpoint

    from bevcache.train import export_student

    run(short_run(_cfg(data_root, cache=fp32_store), tmp_path, 1, ckpt_interval=1))
    out = export_student(str(tmp_path / "iter_1.pth"), str(tmp_path / "student.pth"))
    student = MODELS.build(tiny_cfg("tiny_student.py", data_root).model)
    load_checkpoint(student, out, map_location="cpu", strict=True)  # mmengine's loader, weights-only


@pytest.mark.slow
def test_two_process_training_keeps_memory_banks_identical(data_root, fp32_store, tmp_path):
    script = Path(__file__).with_name("ddp_train_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    result = subprocess.run([torchrun, "--nproc-per-node", "2", "--master-port", str(29600 + os.getpid() % 1000),
                             str(script), str(data_root), fp32_store, str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    banks = [torch.load(tmp_path / f"crd_rank{r}.pt") for r in (0, 1)]
    initial = torch.load(tmp_path / "crd_initial.pt")
    for key in ("memory_s", "memory_t", "z_s", "z_t", "embed_s.weight", "embed_s.bias", "embed_t.weight"):
        assert torch.equal(banks[0][key], banks[1][key]), key  # lazily sized embeddings too (bevcache.lazy_params)
    assert not torch.equal(banks[0]["memory_s"], initial["memory_s"])  # the banks did move


def test_a_runner_checkpoint_is_a_valid_teacher_and_a_wrong_one_is_refused(data_root, tmp_path):
    """Real mmengine checkpoints (message hub inside) load for extraction; a student's does not fit."""
    from bevcache.runtime import load_config
    from bevcache.teacher import build_teacher

    run(short_run(_cfg(data_root), tmp_path / "student", 1, ckpt_interval=1))  # plain student run
    teacher_cfg = load_config(TEACHER)
    with pytest.raises(ConfigError, match="does not fit|pass the checkpoint trained with this config"):
        build_teacher(teacher_cfg, str(tmp_path / "student" / "iter_1.pth"), torch.device("cpu"))
    student = build_teacher(load_config(STUDENT), str(tmp_path / "student" / "iter_1.pth"), torch.device("cpu"))
    assert not student.training and not any(p.requires_grad for p in student.parameters())
