"""The mmengine hooks a distillation run uses, registered in mmdet3d's HOOKS.

- `DistillationHook` (required by CRDDistiller): at before_train, adds the dataset wrappers the
  distiller reads through (replay views, teacher rows per sample) where the config has none and
  rebuilds the train loader around them, then checks the training data against the distiller
  (bevcache.wiring) and hands the per-sample spatial work to the loader workers; with
  augmentation replay, it tells the replay wrapper the epoch before each
  one so every epoch draws fresh views. Any entry point that builds a Runner gets all of it.
- `StudentExportHook`: at the end of training, rank 0 writes the plain student's weights
  (`student_weights.pth` in the work dir), loadable by the student config without bevcache.
- `TrainGuardHook` (bevcache.guard): Ctrl-C / SIGTERM checkpoint and resume guard.
"""

from __future__ import annotations

from pathlib import Path

from mmdet3d.registry import HOOKS
from mmengine.hooks import Hook

from .errors import ConfigError
from .replay import find_replay_dataset, repeated_views_warning


def unwrap_model(model):
    """The model inside a DDP (or other) wrapper."""
    return model.module if hasattr(model, "module") else model


def restart_loader_workers(loop) -> None:
    """mmengine's IterBasedTrainLoop starts its loader (and forks its workers) when it is built,
    before any hook runs: a fresh iterator makes the workers see what `before_train` changed
    (the pipeline without dropped transforms, the replay wrapper's K)."""
    iterator = getattr(loop, "dataloader_iterator", None)
    if iterator is None:
        return
    stale = getattr(loop.dataloader, "_iterator", None)  # persistent workers are kept by the DataLoader itself
    if stale is not None:
        stale._shutdown_workers()
        loop.dataloader._iterator = None
    # mmengine's InfiniteSampler yields from one index generator made at init, which closing the old
    # iterator closes too: a fresh one (same seed, so the same order as a fresh start).
    sampler = getattr(loop.dataloader, "sampler", None)
    if sampler is not None and hasattr(sampler, "_indices_of_rank") and hasattr(sampler, "indices"):
        sampler.indices = sampler._indices_of_rank()
    loop.dataloader_iterator = type(iterator)(loop.dataloader)


def rebuild_train_loader(runner, dataset) -> None:
    """The train loop's loader again, with the same settings and seed, around `dataset` (wrapped
    after the Runner built it). No batch has been drawn yet, so the order is the one it would have had."""
    loop = runner.train_loop
    stale = getattr(loop.dataloader, "_iterator", None)  # an iteration-based loop forked workers at build time
    if stale is not None:
        stale._shutdown_workers()
        loop.dataloader._iterator = None
    dataloader_cfg = dict(runner.cfg.get("train_dataloader"), dataset=dataset)
    diff_rank_seed = (runner.cfg.get("randomness") or {}).get("diff_rank_seed", False)
    loop.dataloader = runner.build_dataloader(dataloader_cfg, seed=runner.seed, diff_rank_seed=diff_rank_seed)


@HOOKS.register_module()
class DistillationHook(Hook):
    """Data checks at before_train; replay epochs. Iteration-based loops count a pass of
    len(dataloader) iterations as an epoch; batches prefetched across a pass boundary keep the
    previous pass's views, and the lookup stays exact because each sample carries its view id."""

    priority = "VERY_HIGH"

    def __init__(self) -> None:
        self._iters_per_pass: int | None = None  # set for iteration-based loops only

    def before_train(self, runner) -> None:
        from mmengine.runner import EpochBasedTrainLoop

        model = unwrap_model(runner.model)
        if not hasattr(model, "attach_train_data"):
            raise ConfigError(f"DistillationHook needs a CRDDistiller model; this config's model is "
                              f"{type(model).__name__}. Remove the hook or set model=dict(type='CRDDistiller', ...).")
        from .wiring import add_wrappers, base_pipeline_cfg, prepare_maps_in_workers

        pipeline_cfg = base_pipeline_cfg(runner.cfg.get("train_dataloader", {}).get("dataset"))
        dataset = runner.train_dataloader.dataset
        wrapped = add_wrappers(model, dataset, pipeline_cfg, seed=(runner.cfg.get("randomness") or {}).get("seed"))
        if wrapped is not dataset:
            rebuild_train_loader(runner, wrapped)
        model.attach_train_data(runner.train_dataloader.dataset, pipeline_cfg)
        prepare_maps_in_workers(model, runner.train_dataloader.dataset)
        if not isinstance(runner.train_loop, EpochBasedTrainLoop):
            self._iters_per_pass = max(len(runner.train_dataloader), 1)
            restart_loader_workers(runner.train_loop)
        self._warn_repeated_views(runner)

    def _warn_repeated_views(self, runner) -> None:
        replay = find_replay_dataset(runner.train_dataloader.dataset)
        if replay is None or not replay.num_views:
            return
        loop = runner.train_loop
        passes = -(-loop.max_iters // self._iters_per_pass) if self._iters_per_pass else loop.max_epochs
        message = repeated_views_warning(replay.num_views, passes)
        if message:
            from mmengine.logging import print_log

            print_log(message, logger="current", level=30)

    def before_train_epoch(self, runner) -> None:
        self._set_epoch(runner, runner.epoch)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if self._iters_per_pass:
            self._set_epoch(runner, runner.iter // self._iters_per_pass)

    @staticmethod
    def _set_epoch(runner, epoch: int) -> None:
        replay = find_replay_dataset(runner.train_dataloader.dataset)
        if replay is not None and replay.epoch != epoch:
            replay.set_epoch(epoch)


@HOOKS.register_module()
class StudentExportHook(Hook):
    """After training, rank 0 saves the plain student's weights to `<work_dir>/<filename>`."""

    priority = "LOWEST"

    def __init__(self, filename: str = "student_weights.pth") -> None:
        self.filename = filename

    def after_train(self, runner) -> None:
        from mmengine.dist import is_main_process
        from mmengine.runner import save_checkpoint

        from .teacher import student_state_dict

        if is_main_process():
            path = Path(runner.work_dir) / self.filename
            state = student_state_dict(unwrap_model(runner.model).state_dict())  # keeps spconv's _metadata
            save_checkpoint({"state_dict": state, "meta": {"exported_from": str(runner.work_dir)}}, str(path))
            runner.logger.info(f"student weights (loadable without bevcache): {path}")
