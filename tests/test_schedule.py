"""Short runs by flag (bevcache.schedule): the loop type, the schedulers' ends, checkpoints and logs
move with --max-iters / --max-epochs, where `--cfg-options train_cfg.max_iters=N` fails in mmengine."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mmengine.config import Config

from bevcache.cli import main
from bevcache.errors import SettingError
from bevcache.schedule import NEVER, set_run_length

from .conftest import CONFIGS


def bevfusion_like() -> Config:
    """BEVFusion's schedule shape: by_epoch train_cfg without a type, two cyclic phases in epochs."""
    return Config(dict(
        train_cfg=dict(by_epoch=True, max_epochs=20, val_interval=5),
        param_scheduler=[
            dict(type="LinearLR", start_factor=0.33, by_epoch=False, begin=0, end=500),
            dict(type="CosineAnnealingLR", T_max=8, eta_min=1e-3, begin=0, end=8, by_epoch=True,
                 convert_to_iter_based=True),
            dict(type="CosineAnnealingLR", T_max=12, eta_min=1e-7, begin=8, end=20, by_epoch=True,
                 convert_to_iter_based=True),
        ],
        default_hooks=dict(logger=dict(type="LoggerHook", interval=50),
                           checkpoint=dict(type="CheckpointHook", interval=5))))


def test_max_iters_makes_an_iteration_run_of_the_epoch_schedule():
    cfg = set_run_length(bevfusion_like(), max_iters=10)
    assert cfg.train_cfg == dict(type="IterBasedTrainLoop", max_iters=10, val_interval=NEVER)
    warmup, first, second = cfg.param_scheduler
    assert (warmup.by_epoch, warmup.begin, warmup.end) == (False, 0, 10)  # iteration counts clipped
    # The two epoch phases keep their 8:12 shape, now in iterations.
    assert (first.by_epoch, first.begin, first.end, first.T_max) == (False, 0, 4, 4)
    assert (second.by_epoch, second.begin, second.end, second.T_max) == (False, 4, 10, 6)
    assert not first.convert_to_iter_based
    assert cfg.default_hooks.checkpoint.by_epoch is False and cfg.default_hooks.checkpoint.interval == 10
    assert cfg.default_hooks.logger.interval == 10 and cfg.log_processor.by_epoch is False


def test_max_epochs_rescales_epoch_schedulers_and_keeps_validation():
    cfg = set_run_length(bevfusion_like(), max_epochs=5, val_interval=None)
    assert cfg.train_cfg == dict(type="EpochBasedTrainLoop", max_epochs=5, val_interval=5)
    warmup, first, second = cfg.param_scheduler
    assert (warmup.begin, warmup.end) == (0, 500)  # iterations: untouched by an epoch run
    assert (first.begin, first.end, first.T_max) == (0, 2, 2) and first.by_epoch
    assert (second.begin, second.end) == (2, 5)
    assert cfg.default_hooks.checkpoint.interval == 5


def test_val_interval_alone_and_bad_values():
    cfg = set_run_length(bevfusion_like(), val_interval=2)
    assert cfg.train_cfg.max_epochs == 20 and cfg.train_cfg.val_interval == 2
    with pytest.raises(SettingError, match="exclude each other"):
        set_run_length(bevfusion_like(), max_iters=3, max_epochs=1)
    with pytest.raises(SettingError, match="max_iters must be >= 1"):
        set_run_length(bevfusion_like(), max_iters=0)


@pytest.mark.parametrize("flags, loop, length", [(["--max-iters", "3"], "IterBasedTrainLoop", 3),
                                                 (["--max-epochs", "1"], "EpochBasedTrainLoop", 1)])
def test_train_by_flag_builds_a_runner_that_runs_that_long(data_root, tmp_path, flags, loop, length):
    from mmengine.runner import Runner

    from bevcache.train import TrainOptions, build_train_config

    opts = TrainOptions(student=str(CONFIGS / "tiny_student.py"), plain=True, work_dir=str(tmp_path),
                        data_root=str(data_root),
                        max_iters=length if "--max-iters" in flags else None,
                        max_epochs=length if "--max-epochs" in flags else None)
    cfg = build_train_config(opts)
    assert cfg.train_cfg.type == loop
    runner = Runner.from_cfg(cfg)
    assert type(runner.train_loop).__name__ == loop
    assert runner.train_loop.max_iters == (length if loop == "IterBasedTrainLoop" else length * len(runner.train_dataloader))


def test_a_short_run_from_the_command_line(data_root, tmp_path):
    """`bevcache train --max-iters 2`: two iterations, a checkpoint at the end, no validation."""
    work = tmp_path / "short"
    result = CliRunner().invoke(main, ["train", "--student", str(CONFIGS / "tiny_student.py"), "--plain",
                                       "--work-dir", str(work), "--data-root", str(data_root), "--max-iters", "2",
                                       "--cfg-options", "train_dataloader.num_workers=0",
                                       "train_dataloader.persistent_workers=False"])
    assert result.exit_code == 0, result.output
    assert (work / "iter_2.pth").is_file() and not (work / "iter_3.pth").exists()
    assert "mAP" not in result.output
