"""Stage two: `bevcache train`, a thin launcher over mmengine's Runner.

A student config is turned into the Runner config any mmengine entry point would run: a config
that already names `model=dict(type='CRDDistiller', ...)` is used as it is; the older form, a
student model plus a `distill = dict(...)` section, is translated into exactly that model config
(one code path behind both). What the distiller needs from the store and the data it finds and
checks itself, and DistillationHook wraps the train dataset for replay views and teacher rows
(bevcache.distiller, bevcache.hooks, bevcache.wiring), so mmdet3d's tools/train.py runs the same
config the same way. This module only adds command-line conveniences: --data-root, --work-dir,
--resume, --amp, short runs, the launcher, Ctrl-C handling and the two hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import (
    base_dataset_cfg,
    build_base_dataset,
    check_data_files,
    set_data_root,
    summary_shown,
    test_pipeline,
)
from .errors import ConfigError, SettingError
from .runtime import (
    check_writable_location,
    init_distributed,
    load_config,
    parse_cfg_options,
    setup_runtime,
)
from .schedule import set_run_length

log = logging.getLogger("bevcache")

# Distiller arguments that are not `distill` settings (the launcher or the store fills them in).
NOT_SETTINGS = ("self", "student", "teacher", "teacher_checkpoint", "trust_checkpoint", "num_data", "student_dims",
                "teacher_dims", "teacher_inputs", "init_cfg")
# Hooks every distillation run gets (a config may list them itself).
DISTILL_HOOKS = ("DistillationHook", "StudentExportHook")


@dataclass
class TrainOptions:
    """What `bevcache train` was asked to do."""

    student: str
    cache: str | None = None
    work_dir: str | None = None
    resume: str | None = None  # None: no resume; "auto": latest checkpoint in work_dir; else a path
    cfg_options: Sequence[str] | dict = field(default_factory=tuple)
    distill_options: Sequence[str] | dict = field(default_factory=tuple)
    launcher: str = "none"
    amp: bool = False
    teacher_online: str | None = None
    teacher_checkpoint: str | None = None
    trust_checkpoint: bool = False
    plain: bool = False
    data_root: str | None = None
    max_iters: int | None = None  # a short run (bevcache.schedule)
    max_epochs: int | None = None
    val_interval: int | None = None


def distill_setting_names() -> tuple[str, ...]:
    """The keys a `distill = dict(...)` section may set: CRDDistiller's own arguments, whose
    signature holds their defaults (one place)."""
    import inspect

    from .distiller import CRDDistiller

    return tuple(p for p in inspect.signature(CRDDistiller.__init__).parameters if p not in NOT_SETTINGS)


def _distill_settings(cfg, opts: TrainOptions) -> dict:
    """The settings given (config section + --distill + --cache); absent ones take the distiller's defaults."""
    settings = dict(cfg.get("distill", {}) or {})
    settings.update(parse_cfg_options(opts.distill_options))
    known = distill_setting_names()
    unknown = set(settings) - set(known)
    if unknown:  # (a dotted override such as spatial.grid=... is not merged: pass spatial={...} whole)
        raise SettingError(f"unknown distill settings {sorted(unknown)}; known: {sorted(known)} "
                           "(a nested setting is passed whole, e.g. --distill \"spatial={'grid': (16, 16)}\").")
    if opts.cache:
        settings["cache"] = opts.cache
    return {k: v for k, v in settings.items() if v is not None}


def distiller_model_cfg(student: dict, settings: dict) -> dict:
    """The CRDDistiller model config for a student model and `distill` settings."""
    return dict(type="CRDDistiller", student=student, **settings)


def build_train_config(opts: TrainOptions):
    """The Runner config for a plain, cached-CRD or online-CRD run."""
    setup_runtime()
    cfg = load_config(opts.student, opts.cfg_options)
    if opts.data_root:
        set_data_root(cfg, opts.data_root)
    check_data_files(cfg, loaders=("train_dataloader",))  # a missing file is named by its config key
    cfg.work_dir = opts.work_dir or cfg.get("work_dir") or f"work_dirs/{Path(opts.student).stem}"
    check_writable_location(cfg.work_dir, "--work-dir")  # before the store or any model is touched
    summary_shown(base_dataset_cfg(cfg, "train"))  # the Runner prints the dataset's summary; bevcache's builds stay quiet
    build_base_dataset(cfg, "train", pipeline=[])  # an empty or unreadable dataset is one line, before the Runner
    if opts.resume not in (None, "auto") and not Path(opts.resume).is_file():
        raise ConfigError(f"--resume {opts.resume}: no such checkpoint; pass an existing .pth or --resume alone "
                          "for the work dir's last checkpoint.")
    set_run_length(cfg, max_iters=opts.max_iters, max_epochs=opts.max_epochs, val_interval=opts.val_interval)
    cfg.launcher = opts.launcher
    if opts.launcher != "none":
        init_distributed(opts.launcher, cfg)  # the Runner reuses the group
        if not torch.cuda.is_available():
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    if opts.amp:
        if not torch.cuda.is_available():
            raise ConfigError("--amp needs a CUDA device (mmengine's AmpOptimWrapper); this machine has none.")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if opts.resume:
        cfg.resume = True
        cfg.load_from = None if opts.resume == "auto" else opts.resume

    online = opts.teacher_online is not None
    if cfg.model.get("type") == "CRDDistiller":  # the config form: the model section says it all
        if opts.plain:
            cfg.model = cfg.model.student
            cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") not in DISTILL_HOOKS]
            cfg.custom_hooks.append(dict(type="StudentExportHook"))
            return cfg
        model = cfg.model
        model.update(parse_cfg_options(opts.distill_options))
        if opts.cache:
            model["cache"] = opts.cache
            model.pop("teacher", None)
    else:
        settings = _distill_settings(cfg, opts)
        cfg.pop("distill", None)
        if opts.plain or (not online and not settings.get("cache")):
            log.info("no cache and no online teacher: training the student plainly (baseline)")
            cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="StudentExportHook")]
            return cfg
        model = distiller_model_cfg(cfg.model, settings)
    if opts.teacher_online is not None:
        teacher_cfg = load_config(opts.teacher_online)
        model.pop("cache", None)
        model.update(teacher=teacher_cfg.model.to_dict(), teacher_checkpoint=opts.teacher_checkpoint,
                     trust_checkpoint=opts.trust_checkpoint)
        from .inputs import add_teacher_inputs

        teacher_inputs = add_teacher_inputs(cfg, teacher_cfg)  # e.g. camera images for a fused teacher
        if teacher_inputs:
            model["teacher_inputs"] = list(teacher_inputs)
        model["num_data"] = len(build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg)))
    cfg.model = model
    from .distiller import check_model_cfg

    check_model_cfg(model)  # a bad setting is one line before the Runner builds anything
    hooks = list(cfg.get("custom_hooks", []))
    have = {h.get("type") for h in hooks}
    cfg.custom_hooks = [h for h in hooks if h.get("type") != "TrainGuardHook"]  # train() adds its own
    cfg.custom_hooks += [dict(type=t) for t in DISTILL_HOOKS if t not in have]
    return cfg


def export_student(checkpoint: str, out: str, *, trust: bool = False) -> str:
    """Write the plain student's weights from a distiller (or plain) checkpoint."""
    from .teacher import export_student as export

    return export(checkpoint, out, trust=trust)


def train(opts: TrainOptions):
    """Build the config, run mmengine's Runner (StudentExportHook writes the student weights); returns the Runner."""
    from mmengine.runner import Runner

    from .guard import interruptible, run_guarded

    with interruptible() as interrupt:  # Ctrl-C/SIGTERM: checkpoint at the iteration's end, then stop
        cfg = build_train_config(opts)
        runner = Runner.from_cfg(cfg)
        run_guarded(runner, interrupt)
    return runner
