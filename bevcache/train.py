"""Stage two: turn a student config (+ its `distill` section) into a Runner config and train.

Everything a run needs is decided here, before the Runner exists: which teacher side (store or
online reference), n_data (the store's rows, which must equal the training set), each layer's
width (one probe forward of the student on sample 0), nce_k clamping, what to do with random
train transforms. The Runner then does the rest; no training loop lives in bevcache.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import (
    INDEX_PRESERVING_WRAPPERS,
    build_base_dataset,
    dataset_identity,
    ensure_index_meta,
    random_transforms,
    set_data_root,
    strip_random_transforms,
    test_pipeline,
    unwrap_dataset_cfg,
)
from .errors import ConfigError, StoreError
from .features import LayerRecorder
from .replay import check_same_pipeline
from .runtime import init_distributed, load_config, parse_cfg_options, setup_runtime
from .store import fingerprint_tokens, open_store

log = logging.getLogger("bevcache")

DISTILL_DEFAULTS = dict(cache=None, layers={"pts_neck": "pts_neck"}, alpha=1.0, feat_dim=128, nce_k=16384,
                        nce_t=0.07, nce_m=0.5, z_momentum=None, pooling=None, augmentation="drop", views=None)
# Random train transforms: drop them, keep them (the cached vector then describes another input),
# or replay the store's augmented views exactly (bevcache.replay).
AUGMENTATION_POLICIES = ("drop", "keep", "replay")


@dataclass
class TrainOptions:
    """What `bevcache train` was asked to do."""

    student: str
    cache: str | None = None
    work_dir: str | None = None
    resume: str | None = None  # None: no resume; "auto": latest checkpoint in work_dir; else a path
    cfg_options: Sequence[str] = field(default_factory=tuple)
    distill_options: Sequence[str] = field(default_factory=tuple)
    launcher: str = "none"
    amp: bool = False
    teacher_online: str | None = None
    teacher_checkpoint: str | None = None
    plain: bool = False
    data_root: str | None = None


def _probe_dims(model: torch.nn.Module, dataset, layers: Sequence[str], pooling: dict[str, str]) -> dict[str, int]:
    """Pooled width of each layer from one forward on sample 0 (also validates the layer names)."""
    from mmengine.dataset import pseudo_collate

    with LayerRecorder(model, layers, stop_early=True) as rec, torch.no_grad():
        was_training = model.training
        model.eval()
        data = model.data_preprocessor(pseudo_collate([dataset[0]]), False)
        rec.run(model, **data, mode="predict")
        model.train(was_training)
        return {k: int(v.shape[1]) for k, v in rec.pooled(pooling, 1).items()}


def _distill_settings(cfg, opts: TrainOptions) -> dict:
    settings = {**DISTILL_DEFAULTS, **dict(cfg.get("distill", {}) or {})}
    unknown = set(settings) - set(DISTILL_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown distill settings {sorted(unknown)}; known: {sorted(DISTILL_DEFAULTS)}.")
    settings.update(parse_cfg_options(opts.distill_options))
    if opts.cache:
        settings["cache"] = opts.cache
    if float(settings["alpha"]) < 0:
        raise ConfigError(f"distill.alpha must be >= 0. Got {settings['alpha']}.")
    if settings["augmentation"] not in AUGMENTATION_POLICIES:
        raise ConfigError(f"distill.augmentation must be one of {list(AUGMENTATION_POLICIES)}. Got {settings['augmentation']!r}.")
    if not isinstance(settings["layers"], dict) or not settings["layers"]:
        raise ConfigError("distill.layers must map student layer names to teacher layer names, e.g. dict(pts_neck='pts_neck').")
    return settings


def build_train_config(opts: TrainOptions):
    """The Runner config for a plain, cached-CRD or online-CRD run."""
    from mmdet3d.registry import MODELS

    setup_runtime()
    cfg = load_config(opts.student, opts.cfg_options)
    if opts.data_root:
        set_data_root(cfg, opts.data_root)
    cfg.work_dir = opts.work_dir or cfg.get("work_dir") or f"work_dirs/{Path(opts.student).stem}"
    from .runtime import check_writable_location

    check_writable_location(cfg.work_dir, "--work-dir")  # before the store or any model is touched
    if opts.resume not in (None, "auto") and not Path(opts.resume).is_file():
        raise ConfigError(f"--resume {opts.resume}: no such checkpoint; pass an existing .pth or --resume alone "
                          "for the work dir's last checkpoint.")
    cfg.launcher = opts.launcher
    if opts.launcher != "none" and not torch.cuda.is_available():
        init_distributed(opts.launcher)  # gloo; the Runner reuses the group
        cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)
    if opts.amp:
        if not torch.cuda.is_available():
            raise ConfigError("--amp needs a CUDA device (mmengine's AmpOptimWrapper); this machine has none.")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    if opts.resume:
        from .compat import trust_own_checkpoints_for_resume

        trust_own_checkpoints_for_resume()
        cfg.resume = True
        cfg.load_from = None if opts.resume == "auto" else opts.resume
    ensure_index_meta(unwrap_dataset_cfg(cfg.train_dataloader.dataset).pipeline)

    settings = _distill_settings(cfg, opts)
    online = opts.teacher_online is not None
    if opts.plain or (not online and not settings["cache"]):
        cfg.pop("distill", None)
        log.info("no cache and no online teacher: training the student plainly (baseline)")
        return cfg

    # Random train transforms make the student see another input than the cached teacher saw.
    train_ds = unwrap_dataset_cfg(cfg.train_dataloader.dataset)
    randoms = random_transforms(train_ds.pipeline)
    replay = settings["augmentation"] == "replay"
    if replay:
        log.info("distillation: replaying the teacher's augmented views (random transforms %s)", randoms)
    elif randoms:
        if settings["augmentation"] == "drop":
            log.warning("distillation: dropping random train transforms %s (distill.augmentation='drop'); "
                        "'replay' (a store extracted with --views K) distils on augmented inputs", randoms)
            train_ds.pipeline = strip_random_transforms(train_ds.pipeline)
        elif online:
            log.info("distillation: keeping random train transforms %s; the online teacher sees the same "
                     "augmented batch (distill.augmentation='keep')", randoms)
        else:
            log.warning("distillation: keeping random train transforms %s although the cached teacher features "
                        "describe the un-augmented sample (distill.augmentation='keep'); 'replay' avoids that", randoms)

    dataset = build_base_dataset(cfg, "train", pipeline=test_pipeline(cfg))
    tokens, _ = dataset_identity(dataset)
    layers = dict(settings["layers"])
    model_kwargs: dict = {}
    if online:
        teacher_cfg = load_config(opts.teacher_online)
        if opts.data_root:
            set_data_root(teacher_cfg, opts.data_root)
        pooling = {s: settings["pooling"] or "avg" for s in layers}
        from .extract import build_teacher

        with torch.random.fork_rng(devices=[]):
            teacher = build_teacher(teacher_cfg, opts.teacher_checkpoint, torch.device("cpu"))
        teacher_pool = {t: pooling[s] for s, t in layers.items()}
        teacher_dims = _probe_dims(teacher, dataset, list(teacher_pool), teacher_pool)
        del teacher
        model_kwargs.update(teacher=teacher_cfg.model.to_dict(), teacher_checkpoint=opts.teacher_checkpoint)
    else:
        store = open_store(settings["cache"])
        if not store.complete_mask().all():
            missing = int((~store.complete_mask()).sum())
            raise StoreError(f"store {settings['cache']} is incomplete ({missing} of {store.num_samples} rows "
                             "missing): finish it with `bevcache extract --resume` first.")
        store.check_matches(dataset=fingerprint_tokens(tokens))
        absent = [t for t in layers.values() if t not in store.layers]
        if absent:
            raise StoreError(f"teacher layer(s) {absent} are not in store {settings['cache']}; it holds {sorted(store.layers)}.")
        pooling = {s: settings["pooling"] or store.layers[t].pooling for s, t in layers.items()}
        teacher_dims = {t: store.layers[t].dim for t in layers.values()}
        model_kwargs.update(cache=settings["cache"])
        if replay:
            if not store.num_views:
                raise StoreError(f"distill.augmentation='replay' needs a store with augmented views; {settings['cache']} "
                                 "has none. Extract with `bevcache extract --views K` (e.g. 4).")
            check_same_pipeline(store.attrs.get("augmentation", {}), train_ds.pipeline, where=settings["cache"])
            settings["views"] = store.num_views
            model_kwargs.update(replay=True)
    if replay:
        _wrap_for_replay(cfg, settings, fingerprint_tokens(tokens)["sha256"])

    with torch.random.fork_rng(devices=[]):
        probe = MODELS.build(copy.deepcopy(cfg.model))
    student_dims = _probe_dims(probe, dataset, list(layers), pooling)
    del probe
    nce_k = int(settings["nce_k"])
    if nce_k >= len(tokens):
        log.warning("distill.nce_k=%d >= n_data=%d: clamped to %d", nce_k, len(tokens), len(tokens) - 1)
        nce_k = len(tokens) - 1
    cfg.model = dict(
        type="CRDDistiller", student=cfg.model, layers=layers, student_dims=student_dims,
        teacher_dims=teacher_dims, num_data=len(tokens), pooling=pooling, alpha=float(settings["alpha"]),
        feat_dim=int(settings["feat_dim"]), nce_k=nce_k, nce_t=float(settings["nce_t"]),
        nce_m=float(settings["nce_m"]), z_momentum=settings["z_momentum"], **model_kwargs)
    return cfg


def _wrap_for_replay(cfg, settings: dict, fingerprint: str) -> None:
    """Put ReplayViewsDataset right around the base train dataset (inside CBGS/Repeat wrappers)
    and the hook that advances its epoch."""
    views = settings["views"]
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise ConfigError("distill.augmentation='replay' with an online teacher needs distill.views=K (K >= 1), "
                          f"the number of augmented views to draw from. Got {views!r}.")
    parent = cfg.train_dataloader
    while parent["dataset"].get("type") in INDEX_PRESERVING_WRAPPERS:
        parent = parent["dataset"]
    base = parent["dataset"]
    base["filter_empty_gt"] = False  # every view must exist, as it did when the teacher saw it
    seed = (cfg.get("randomness") or {}).get("seed")
    parent["dataset"] = dict(type="ReplayViewsDataset", dataset=base, num_views=views, fingerprint=fingerprint,
                             seed=0 if seed is None else int(seed))
    cfg.custom_hooks = [*cfg.get("custom_hooks", []), dict(type="ReplayEpochHook")]


def export_student(checkpoint: str, out: str) -> str:
    """Write the plain student's weights from a distiller (or plain) checkpoint."""
    if not Path(checkpoint).is_file():
        raise ConfigError(f"checkpoint not found: {checkpoint}")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    student = {k[len("student."):]: v for k, v in state.items() if k.startswith("student.")}
    if not student:  # a plain run's checkpoint is already the student
        student = {k: v for k, v in state.items() if not k.startswith("crd.")}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": student, "meta": {"exported_from": str(checkpoint)}}, out)
    return out


def train(opts: TrainOptions):
    """Build the config, run mmengine's Runner, export the student weights; returns the Runner."""
    from mmengine.runner import Runner

    from .guard import interruptible, run_guarded

    with interruptible() as interrupt:  # Ctrl-C/SIGTERM: checkpoint at the iteration's end, then stop
        cfg = build_train_config(opts)
        runner = Runner.from_cfg(cfg)
        run_guarded(runner, interrupt)
    if runner.rank == 0:
        last = Path(runner.work_dir) / "last_checkpoint"
        if last.is_file():
            ckpt = last.read_text().strip()
            export_student(ckpt, str(Path(runner.work_dir) / "student_weights.pth"))
    return runner


def iteration_run(cfg, *, work_dir: str | Path, iters: int, batch_size: int = 2, workers: int = 0,
                  seed: int = 0, checkpoint_interval: int | None = None, shuffle: bool = True):
    """Turn a Runner config into a short iteration-based run (tests, benchmarks, smoke checks):
    `iters` steps at constant LR, no validation, checkpoints every `checkpoint_interval` steps."""
    cfg.work_dir = str(work_dir)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=10**9)
    cfg.param_scheduler = []
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=checkpoint_interval or 10**9,
                                        by_epoch=False, save_last=checkpoint_interval is not None)
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=1)
    cfg.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)
    cfg.train_dataloader.update(batch_size=batch_size, num_workers=workers, persistent_workers=False,
                                sampler=dict(type="InfiniteSampler", shuffle=shuffle))
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.test_dataloader = cfg.test_cfg = cfg.test_evaluator = None
    cfg.randomness = dict(seed=seed, deterministic=False)
    return cfg
