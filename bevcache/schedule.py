"""A run's length: `--max-iters N` / `--max-epochs N` / `--val-interval K` applied to a Runner config.

mmengine cannot be asked for a short run with `--cfg-options` alone: `train_cfg` is merged key by key,
so `train_cfg.by_epoch=False train_cfg.max_iters=5` keeps `max_epochs` and IterBasedTrainLoop
refuses it; the schedulers keep their epoch ends; the checkpoint and logger hooks keep intervals a
short run never reaches. `set_run_length` replaces `train_cfg` whole and moves everything that
depends on the length with it:
- epoch-based schedulers (`by_epoch=True`) keep their shape, scaled to the new length (begin, end,
  T_max, milestones); for an iteration run they become iteration-based over `max_iters`;
- iteration-based schedulers (warm-ups) keep their iteration counts, clipped to `max_iters`;
- validation: the config's interval (clipped) for epochs; none for iterations unless `val_interval`
  (the val loop is removed: IterBasedTrainLoop would otherwise validate after its last iteration);
- a checkpoint at the end of the run, and a log line at least every iteration of a run shorter than
  the logger's interval.
"""

from __future__ import annotations

import copy
from typing import Any

from .errors import SettingError

NEVER = 10**9  # an interval a run never reaches


def _config_epochs(cfg: Any) -> int | None:
    train_cfg = cfg.get("train_cfg") or {}
    epochs = train_cfg.get("max_epochs")
    return int(epochs) if epochs else None


def _scaled(value: float, factor: float) -> int:
    return max(int(round(value * factor)), 0)


def _rescale_scheduler(sched: dict, *, epochs_before: int | None, max_epochs: int | None, max_iters: int | None) -> dict:
    s = copy.deepcopy(dict(sched))
    if not s.get("by_epoch", True):  # iteration counts (warm-up): kept, clipped to a shorter iteration run
        if max_iters is not None:
            s["begin"] = min(int(s.get("begin", 0)), max_iters)
            if s.get("end") is not None:
                s["end"] = max(min(int(s["end"]), max_iters), s["begin"] + 1)
        return s
    if epochs_before is None:
        return s
    end = s.get("end", epochs_before)
    end = epochs_before if end is None or end > epochs_before else end
    if max_iters is not None:  # the epoch schedule squeezed into max_iters iterations
        factor = max_iters / epochs_before
        s.update(by_epoch=False, convert_to_iter_based=False)
    else:
        assert max_epochs is not None  # one of the two is given (set_run_length)
        factor = max_epochs / epochs_before
    s["begin"] = _scaled(s.get("begin", 0), factor)
    s["end"] = max(_scaled(end, factor), s["begin"] + 1)
    if "T_max" in s:
        s["T_max"] = max(_scaled(s["T_max"], factor), 1)
    if "milestones" in s:
        s["milestones"] = [_scaled(m, factor) for m in s["milestones"]]
    return s


def set_run_length(cfg: Any, *, max_iters: int | None = None, max_epochs: int | None = None,
                   val_interval: int | None = None) -> Any:
    """Make `cfg` train for `max_iters` iterations or `max_epochs` epochs (not both); returns cfg."""
    if max_iters is not None and max_epochs is not None:
        raise SettingError("--max-iters and --max-epochs exclude each other: give one of them.")
    for name, value in (("max_iters", max_iters), ("max_epochs", max_epochs), ("val_interval", val_interval)):
        if value is not None and int(value) < 1:
            raise SettingError(f"{name} must be >= 1. Got {value}.")
    if max_iters is None and max_epochs is None:
        if val_interval is not None:
            cfg.train_cfg = {**dict(cfg.get("train_cfg") or {}), "val_interval": int(val_interval)}
        return cfg
    epochs_before = _config_epochs(cfg)
    schedulers = cfg.get("param_scheduler") or []
    if isinstance(schedulers, dict):
        schedulers = [schedulers]
    cfg.param_scheduler = [_rescale_scheduler(s, epochs_before=epochs_before, max_epochs=max_epochs,
                                              max_iters=max_iters) for s in schedulers]
    hooks = cfg.setdefault("default_hooks", {})
    if max_iters is not None:
        cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=int(max_iters),
                             val_interval=int(val_interval) if val_interval else NEVER)
        if not val_interval:  # IterBasedTrainLoop validates at its last iteration whatever the interval
            cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
        length, by_epoch = int(max_iters), False
        cfg.log_processor = {**dict(cfg.get("log_processor") or {}), "by_epoch": False}
    else:
        assert max_epochs is not None  # given: max_iters is None here
        epochs = int(max_epochs)
        before = int((cfg.get("train_cfg") or {}).get("val_interval", 1))
        cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=epochs,
                             val_interval=int(val_interval) if val_interval else min(before, epochs))
        length, by_epoch = epochs, True
    checkpoint = dict(hooks.get("checkpoint") or {"type": "CheckpointHook"})
    checkpoint.update(by_epoch=by_epoch, save_last=True,
                      interval=min(int(checkpoint.get("interval", length)), length) if by_epoch else length)
    hooks["checkpoint"] = checkpoint
    if not by_epoch and hooks.get("logger"):
        logger = dict(hooks["logger"])
        logger["interval"] = max(min(int(logger.get("interval", 1)), length), 1)
        hooks["logger"] = logger
    return cfg
