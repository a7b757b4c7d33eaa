"""Stage one: run the frozen teacher once over a split and write pooled layers to a store.

Work is done in the store's chunk-aligned row blocks: a block is written (all layers, then the
completion mask) only when all its rows are computed, by a background writer thread so the disk
never stalls the teacher. Under torchrun each rank takes every world_size-th pending block, so
no two processes ever write the same chunk; rank 0 alone creates the store and finishes it.
With `views=K`, each block also holds K augmented views per row (bevcache.replay): the block's
un-augmented batches come first, then its (index, view) batches, and the block is written whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .data import (
    SPLIT_LOADERS,
    base_dataset_cfg,
    build_base_dataset,
    check_data_files,
    dataset_identity,
    ensure_index_meta,
    set_data_root,
    test_pipeline,
)
from .errors import ConfigError, FeatureValueError, SettingError, StoreError, StoreMismatch
from .features import POOLINGS, LayerRecorder
from .guard import interruptible
from .replay import DIGEST_META, SEED_SCHEME, ReplayViewsDataset, pipeline_record
from .runtime import (
    check_writable_location,
    init_distributed,
    load_config,
    resolve_device,
    setup_runtime,
)
from .store import LayerSpec, create_store, fingerprint_tokens, open_store, store_exists
from .store.location import exclusive_writer
from .teacher import build_teacher, config_record, resolve_teacher_checkpoint, weights_sha256

log = logging.getLogger("bevcache")

DEFAULTS = dict(layers=["pts_neck"], pooling="avg", dtype="float16", split="train", batch_size=1,
                num_workers=2, chunk_rows=256, views=0, spatial={})
SPATIAL_CHUNK_ROWS = 32  # default rows per block when maps are kept


@dataclass
class ExtractOptions:
    """What `bevcache extract` was asked to do; None means: the config's `bevcache` section, else DEFAULTS."""

    config: str
    checkpoint: str | None = None
    out: str | None = None
    layers: Sequence[str] | None = None
    pooling: str | None = None
    dtype: str | None = None
    split: str | None = None
    batch_size: int | None = None
    num_workers: int | None = None
    chunk_rows: int | None = None
    views: int | None = None  # K augmented views per sample (0: only the un-augmented one)
    spatial: str | dict | None = None  # BEV grids to keep maps at: "pts_neck=45" or {layer: (h, w)}
    cfg_options: Sequence[str] = field(default_factory=tuple)
    resume: bool = False
    overwrite: bool = False
    launcher: str = "none"
    device: str | None = None
    data_root: str | None = None
    progress: bool = True
    random_init: bool = False  # knowingly cache a randomly initialised teacher
    trust_checkpoint: bool = False  # unpickle the checkpoint fully (arbitrary code)


def file_sha256(path: str) -> str:
    """sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def block_batches(blocks: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Batches that never straddle a block, so every block is finished by whole batches."""
    return [list(range(s, min(s + batch_size, stop))) for start, stop in blocks for s in range(start, stop, batch_size)]


def block_plan(blocks: Sequence[tuple[int, int]], batch_size: int, views: int) -> list[tuple[int, list, bool]]:
    """(block start, batch keys, last batch of its block?) for every batch: a block's indices
    first, then its (index, view) pairs for views 1..K, never straddling blocks."""
    plan = []
    for start, stop in blocks:
        batches: list[list] = block_batches([(start, stop)], batch_size)
        pairs = [(i, v) for i in range(start, stop) for v in range(1, views + 1)]
        batches += [pairs[s:s + batch_size] for s in range(0, len(pairs), batch_size)]
        plan += [(start, keys, n == len(batches) - 1) for n, keys in enumerate(batches)]
    return plan


class _ExtractionSource:
    """Index i: the un-augmented sample (test pipeline); (i, v): its augmented view v."""

    def __init__(self, plain, views: ReplayViewsDataset | None):
        self.plain, self.views = plain, views

    def __len__(self) -> int:
        return len(self.plain)

    def __getitem__(self, key):
        return self.views[key] if isinstance(key, tuple) else self.plain[key]


class FixedBatches:
    """A batch sampler that yields exactly the given index batches (blocks never straddled)."""

    def __init__(self, sampler=None, batch_size: int = 1, batches: Sequence[list] = ()) -> None:
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def teacher_batches(model, dataset, batches: list[list[int]], num_workers: int,
                    env_cfg: dict | None = None) -> Iterator[tuple[list[int], dict]]:
    """Yield (indices, preprocessed batch) over the given index batches (shared with the benchmark).

    The loader is mmengine's (`Runner.build_dataloader`), so the config's `env_cfg.mp_cfg`
    (start method, OpenCV threads) applies as in training.
    """
    from mmengine.runner import Runner
    from mmengine.utils.dl_utils import set_multi_processing

    if env_cfg is not None:
        set_multi_processing(**dict(env_cfg.get("mp_cfg") or {}), distributed=False)
    loader = Runner.build_dataloader(dict(
        dataset=dataset, sampler=dict(type="DefaultSampler", shuffle=False), batch_size=1,
        batch_sampler=FixedBatches(batches=batches), num_workers=num_workers, persistent_workers=False,
        collate_fn=dict(type="pseudo_collate")))
    for indices, batch in zip(batches, loader, strict=True):
        yield indices, model.data_preprocessor(batch, False)


def pooled_teacher_features(model, recorder: LayerRecorder, data: dict, pooling: str,
                            grids: dict[str, tuple[int, int]] | None = None):
    """Forward one preprocessed batch (cut short after the last hooked layer) and pool it:
    {layer: [B, dim]}; with `grids`, also the spatial maps {layer: [B, C, h, w]} (a pair)."""
    with torch.inference_mode():
        recorder.run(model, **data, mode="predict")
        batch = len(data["data_samples"])
        pooled = recorder.pooled(pooling, batch)
        if grids is None:
            return pooled
        return pooled, recorder.spatial(grids, batch)


class _PendingBlock:
    """One block's rows as they arrive: un-augmented features (and spatial maps), and with views,
    [rows, K, ...] view features and maps and [rows, K] input digests."""

    def __init__(self, rows: tuple[int, int], layers: Sequence[str], num_views: int, spatial: Sequence[str] = ()):
        self.start, stop = rows
        n = stop - self.start
        self.features: dict[str, list[np.ndarray]] = {name: [] for name in layers}
        self.spatial: dict[str, list[np.ndarray]] = {name: [] for name in spatial}
        self.views: dict[str, np.ndarray] = {}
        self.spatial_views: dict[str, np.ndarray] = {}
        self.num_views = num_views
        self.digests = np.zeros((n, num_views), dtype=np.int64)

    def add(self, keys: list, feats: dict[str, np.ndarray], data_samples: list,
            maps: dict[str, np.ndarray] | None = None) -> None:
        for name, value in [*feats.items(), *(maps or {}).items()]:
            bad = ~np.isfinite(value.reshape(len(value), -1)).all(axis=1)
            if bad.any():
                key = keys[int(np.argmax(bad))]
                where = f"dataset index {key[0]}, view {key[1]}" if isinstance(key, tuple) else f"dataset index {key}"
                raise FeatureValueError(f"layer {name!r} is NaN/Inf for {where}: the teacher checkpoint or "
                                        "input is broken; nothing of this block was written.")
        if not isinstance(keys[0], tuple):
            for name, value in feats.items():
                self.features[name].append(value)
            for name, value in (maps or {}).items():
                self.spatial[name].append(value.astype(np.float16))  # the store's dtype for maps
            return
        for target, values in ((self.views, feats), (self.spatial_views, maps or {})):
            for name, value in values.items():
                dtype = np.float16 if target is self.spatial_views else np.float32
                table = target.setdefault(name, np.empty((len(self.digests), self.num_views, *value.shape[1:]), dtype))
                for (index, view), row in zip(keys, value, strict=True):
                    table[index - self.start, view - 1] = row
        for (index, view), sample in zip(keys, data_samples, strict=True):
            self.digests[index - self.start, view - 1] = sample.metainfo[DIGEST_META]

    def finished(self) -> dict:
        out: dict = {"features": {n: np.concatenate(v) for n, v in self.features.items()}}
        if self.spatial:
            out["spatial"] = {n: np.concatenate(v) for n, v in self.spatial.items()}
        if self.num_views:
            out.update(views=self.views, digests=self.digests)
            if self.spatial:
                out["spatial_views"] = self.spatial_views
        return out


class _BlockWriter:
    """Background thread writing finished blocks; a bounded queue keeps memory flat."""

    def __init__(self, store, depth: int = 2):
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.rows_written = 0
        self.thread = threading.Thread(target=self._run, name="bevcache-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.store.write_block(item[0], item[1], **item[2])
                    self.rows_written += len(next(iter(item[1].values())))
                except BaseException as exc:  # surfaced in the main thread by put()/close()
                    self.error = exc

    def put(self, start: int, features: dict[str, np.ndarray], **views) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((start, features, views))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def parse_spatial_grids(value: str | dict | None) -> dict[str, tuple[int, int]]:
    """{layer: (h, w)} from "pts_neck=45,pts_backbone=90x45" or a config's dict(pts_neck=(45, 45))."""
    if not value:
        return {}
    items = value.items() if isinstance(value, dict) else [
        tuple(part.split("=", 1)) if "=" in part else (part, None) for part in str(value).split(",") if part]
    grids = {}
    for name, grid in items:
        try:
            if isinstance(grid, str):
                grid = [int(g) for g in grid.lower().split("x")]
            grid = (int(grid), int(grid)) if isinstance(grid, int) else tuple(int(g) for g in grid or ())
            if len(grid) == 1:
                grid = (grid[0], grid[0])
            if len(grid) != 2 or min(grid) < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"spatial: each layer needs a BEV grid, e.g. pts_neck=45 or pts_neck=90x45 "
                              f"(config: dict(pts_neck=(45, 45))). Got {name}={grid!r}.") from None
        grids[str(name)] = grid
    return grids


def _settings(opts: ExtractOptions, cfg) -> dict:
    section = dict(cfg.get("bevcache", {}) or {})
    merged = {**DEFAULTS, **{k: v for k, v in section.items() if k in DEFAULTS}}
    for key in DEFAULTS:
        value = getattr(opts, key)
        if value is not None:
            merged[key] = value
    if isinstance(merged["layers"], str):
        merged["layers"] = [x for x in merged["layers"].split(",") if x]
    if merged["pooling"] not in POOLINGS:
        raise SettingError(f"pooling must be one of {list(POOLINGS)}. Got {merged['pooling']!r}.")
    if merged["dtype"] not in ("float16", "float32"):
        raise SettingError(f"dtype must be one of ['float16', 'float32']. Got {merged['dtype']!r}.")
    if int(merged["batch_size"]) < 1 or int(merged["chunk_rows"]) < 1:
        raise SettingError("batch_size and chunk_rows must be positive integers.")
    if int(merged["views"]) < 0:
        raise SettingError(f"views must be >= 0 (0: no augmented views). Got {merged['views']}.")
    merged["spatial"] = parse_spatial_grids(merged["spatial"])
    if merged["spatial"] and opts.chunk_rows is None and "chunk_rows" not in section:
        # A block (one shard per map) is held in memory until written: 32 rows of a 512 x 90 x 90
        # float16 map are 265 MB; 256 would be 2 GB.
        merged["chunk_rows"] = SPATIAL_CHUNK_ROWS
    merged["layers"] += [n for n in merged["spatial"] if n not in merged["layers"]]  # pooled too
    merged["out"] = opts.out or section.get("out") or f"work_dirs/{Path(opts.config).stem}/features.zarr"
    return merged


def _views_dataset(cfg, settings: dict, tokens: list[str]) -> tuple[ReplayViewsDataset, dict]:
    """The split's dataset with its own (training) pipeline, seeded per view; and its record."""
    from .pipeline import check_replayable

    pipeline = base_dataset_cfg(cfg, settings["split"]).get("pipeline") or []
    ensure_index_meta(pipeline)  # exactly what the student's pipeline will carry
    record = pipeline_record(pipeline)  # before building: ObjectSample adds keys to its config
    base = build_base_dataset(cfg, settings["split"], pipeline=pipeline)
    # Every view must be reproducible from its seed alone; refused here, before any teacher pass.
    if not check_replayable(pipeline, base):
        log.warning("--views %d: the %s pipeline has no random transforms, so every view equals the "
                    "un-augmented sample's", int(settings["views"]), settings["split"])
    fingerprint = fingerprint_tokens(tokens)["sha256"]
    augmentation = {"views": int(settings["views"]), "seed_scheme": SEED_SCHEME, **record}
    return ReplayViewsDataset(base, int(settings["views"]), fingerprint), augmentation


def _deterministic_test_pipeline(cfg, split: str) -> list:
    """The config's test pipeline with any random step made deterministic or removed: a cached row
    must not depend on the draw (e.g. LoadPointsFromMultiSweeps picks sweeps at random outside
    test_mode; bevcache.pipeline.strip_steps sets test_mode=True instead)."""
    from .pipeline import random_steps, strip_steps

    pipeline = test_pipeline(cfg)
    probe_set = build_base_dataset(cfg, split, pipeline=[])
    steps = random_steps(pipeline, probe_set)
    if steps:
        log.warning("the test pipeline has random steps %s: made deterministic for extraction",
                    [f"{s.type} ({s.where()})" for s in steps])
        pipeline = strip_steps(pipeline, steps)
    return pipeline


def _open_or_create(opts: ExtractOptions, settings: dict, *, layers: list[LayerSpec], spatial: dict, tokens, sample_idx,
                    metadata: dict, rank: int):
    url = settings["out"]
    exists = store_exists(url)
    if rank == 0:
        if exists and not (opts.resume or opts.overwrite):
            raise StoreError(f"a store already exists at {url}: pass --resume to continue it or --overwrite to replace it.")
        if exists and opts.resume:
            store = open_store(url, mode="r+")
            store.check_matches(dataset=metadata["dataset"], teacher={"config_sha256": metadata["teacher"]["config_sha256"]},
                                layers=layers,
                                views=int(settings["views"]), augmentation=metadata.get("augmentation"),
                                spatial=spatial)
            _check_same_teacher(store, metadata["teacher"], url)
        else:
            store = create_store(url, num_samples=len(tokens), layers=layers, dtype=settings["dtype"],
                                 tokens=tokens, sample_idx=sample_idx, metadata=metadata,
                                 chunk_rows=int(settings["chunk_rows"]), overwrite=exists,
                                 views=int(settings["views"]), spatial=spatial or None)
    _barrier(url, blocks_written=False)
    return store if rank == 0 else open_store(url, mode="r+")


def _barrier(url: str, *, blocks_written: bool = True) -> None:
    from mmengine.dist import barrier

    try:
        barrier()
    except RuntimeError as exc:  # a peer died while this rank waited (gloo: "Connection closed by peer")
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        advice = (f"the finished blocks in {url} are durable: run the same command with --resume to finish"
                  if blocks_written else "that rank's own error (rank 0 creates the store) says what to change")
        raise StoreError(f"another rank of this job failed while this one waited for it ({reason}); {advice}.") from None


def _teacher_identity(cfg, opts: ExtractOptions, record: dict, model) -> dict:
    """What makes a teacher this teacher: its weights (sha256 of the state dict's tensors) and config."""
    checkpoint = resolve_teacher_checkpoint(cfg, opts.checkpoint)
    return {
        "config": str(Path(opts.config)),
        "config_sha256": record["sha256"],
        "weights_sha256": weights_sha256(model),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpoint_sha256": file_sha256(checkpoint) if checkpoint and Path(checkpoint).is_file() else None,
        "random_init": checkpoint is None,
    }


def _check_same_teacher(store, teacher: dict, url: str) -> None:
    """Resume only with the very weights the store's rows came from."""
    stored = dict(store.attrs.get("teacher") or {})
    if stored.get("weights_sha256") != teacher["weights_sha256"]:
        def name(t: dict) -> str:
            return f"{t.get('checkpoint') or 'random init'}, weights sha256 {str(t.get('weights_sha256'))[:16]}"
        raise StoreMismatch(
            f"--resume with other teacher weights than the rows already in {url}: the store holds rows of "
            f"({name(stored)}), this run has ({name(teacher)}). Resume with the same --checkpoint, or re-create "
            "the store with --overwrite.")


def extract(opts: ExtractOptions) -> dict:
    """Run extraction as described by opts; returns the store's info()."""
    from mmengine.dist import get_dist_info

    if opts.resume and opts.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: choose one.")
    setup_runtime()
    cfg = load_config(opts.config, opts.cfg_options)
    if opts.data_root:
        set_data_root(cfg, opts.data_root)
    # Without views only the test pipeline runs: the train pipeline's database files are not read.
    check_data_files(cfg, loaders=(SPLIT_LOADERS[_settings(opts, cfg)["split"]],),
                     pipeline_files=bool(int(_settings(opts, cfg)["views"])))
    init_distributed(opts.launcher, cfg)
    rank, world = get_dist_info()
    settings = _settings(opts, cfg)
    check_writable_location(settings["out"], "--out")  # before the teacher is built
    device = resolve_device(opts.device)

    record = config_record(cfg)  # before building: BEVFusion's __init__ pops keys of its config
    teacher_text = cfg.pretty_text
    dataset = build_base_dataset(cfg, settings["split"], pipeline=_deterministic_test_pipeline(cfg, settings["split"]))
    tokens, sample_idx = dataset_identity(dataset)
    augmentation, views_dataset = None, None
    if int(settings["views"]):
        views_dataset, augmentation = _views_dataset(cfg, settings, tokens)
    model = build_teacher(cfg, opts.checkpoint, device, trust_checkpoint=opts.trust_checkpoint,
                          random_init=opts.random_init)
    source = _ExtractionSource(dataset, views_dataset)
    recorder = LayerRecorder(model, settings["layers"], stop_early=True)

    # One sample through the teacher tells each layer's pooled width before the store exists.
    _, probe = next(teacher_batches(model, dataset, [[0]], num_workers=0))
    probed, probed_maps = pooled_teacher_features(model, recorder, probe, settings["pooling"], settings["spatial"])
    broken = [k for k, v in [*probed.items(), *probed_maps.items()] if not torch.isfinite(v).all()]
    if broken:  # a broken checkpoint shows on any sample: refuse before a store exists
        raise FeatureValueError(f"layer(s) {broken} of the teacher are NaN/Inf for dataset index 0 (the probe "
                                f"sample): check the teacher checkpoint ({opts.checkpoint}) and that sample; "
                                f"nothing was written to {settings['out']}.")
    dims = {k: v.shape[1] for k, v in probed.items()}
    layers = [LayerSpec(name=n, dim=int(dims[n]), pooling=settings["pooling"]) for n in settings["layers"]]
    spatial = {n: tuple(int(x) for x in v.shape[1:]) for n, v in probed_maps.items()}  # (C, h, w)
    metadata = {
        "bevcache_version": __version__,
        "split": settings["split"],
        "dataset": fingerprint_tokens(tokens),
        "teacher": _teacher_identity(cfg, opts, record, model),
        "teacher_config": teacher_text,
        "pipeline": "test",
        **({"augmentation": augmentation} if augmentation else {}),
        "created": datetime.now(timezone.utc).isoformat(),
        "world_size": world,
    }
    with contextlib.ExitStack() as stack:
        if rank == 0:
            stack.enter_context(exclusive_writer(settings["out"]))
        return _run(opts, settings, model, source, recorder, layers=layers, spatial=spatial, tokens=tokens,
                    sample_idx=sample_idx, metadata=metadata, rank=rank, world=world, device=device,
                    env_cfg=cfg.get("env_cfg"))


def _run(opts, settings, model, source, recorder, *, layers, spatial, tokens, sample_idx, metadata, rank, world, device,
         env_cfg) -> dict:
    store = _open_or_create(opts, settings, layers=layers, spatial=spatial, tokens=tokens, sample_idx=sample_idx,
                            metadata=metadata, rank=rank)
    my_blocks = store.pending_blocks()[rank::world]
    num_views = int(settings["views"])
    plan = block_plan(my_blocks, int(settings["batch_size"]), num_views)
    total = sum(stop - start for start, stop in my_blocks)
    log.info("extracting %d rows (%d blocks) of %s to %s on %s, rank %d/%d", total, len(my_blocks),
             settings["layers"], settings["out"], device, rank, world)

    progress = None
    if opts.progress and rank == 0 and total:
        from tqdm import tqdm

        progress = tqdm(total=total * (1 + num_views), unit="input", desc="extract", dynamic_ncols=True)
    writer = _BlockWriter(store)
    block_of = {start: (start, stop) for start, stop in my_blocks}
    block: _PendingBlock | None = None
    t0 = time.perf_counter()
    # Ctrl-C / SIGTERM: the first one stops after the batch in progress; finished blocks stay durable.
    with interruptible() as interrupt:
        try:
            batches = [keys for _, keys, _ in plan]
            for (start, _, last), (keys, data) in zip(plan, teacher_batches(
                    model, source, batches, int(settings["num_workers"]), env_cfg), strict=True):
                if block is None or block.start != start:
                    block = _PendingBlock(block_of[start], settings["layers"], num_views, list(spatial))
                feats, maps = pooled_teacher_features(model, recorder, data, settings["pooling"], settings["spatial"])
                block.add(keys, {n: v.float().cpu().numpy() for n, v in feats.items()}, data["data_samples"],
                          {n: v.float().cpu().numpy() for n, v in maps.items()})
                if last:
                    writer.put(block.start, **block.finished())
                if progress:
                    progress.update(len(keys))
                if interrupt.signum is not None:
                    break
        except KeyboardInterrupt:  # a second signal: stop at once
            pass
        finally:
            recorder.remove()
            if progress:
                progress.close()
            writer.close()  # flush every finished block; a block in flight is never half-written
    if interrupt.signum is not None:
        raise StoreError(f"interrupted by {interrupt.name}: {writer.rows_written} rows are durable in {settings['out']}; "
                         "run the same command with --resume to finish.")
    elapsed = time.perf_counter() - t0
    _barrier(settings["out"])
    if rank == 0:
        store = open_store(settings["out"], mode="r+")
        if store.complete_mask().all():
            store.set_attrs(finished=datetime.now(timezone.utc).isoformat())
    _barrier(settings["out"])  # zarr rewrites zarr.json in place: no rank reads it while rank 0 writes
    info = open_store(settings["out"]).info()
    info["rows_this_run"] = total
    info["seconds"] = elapsed
    info["samples_per_second"] = total / elapsed if elapsed > 0 and total else None
    return info
