"""Does the training data fit the distiller? Checked where the data is, whatever launched the run.

`check_train_data` runs at `before_train` (DistillationHook), on every rank, before any loader
worker starts, so mmdet3d's `tools/train.py`, `Runner.from_cfg` and `bevcache train` all get it:
- the base dataset's ordered tokens are the store's (same length, same sha256), or for the online
  reference, its length is the distiller's `num_data`;
- every sample will carry `sample_idx` and `token` (Pack3DDetInputs.meta_keys), the row lookup
  and its per-sample check;
- the augmentation policy is honoured: `drop` strips exactly the pipeline's random transforms
  (found empirically, bevcache.pipeline) and says so; `keep` says what it costs; `replay` reads
  through the ReplayViewsDataset wrapper around the base dataset, made with the store's pipeline.

`add_wrappers` puts the dataset wrappers a distiller reads through (ReplayViewsDataset for replay,
TeacherRowsDataset for rows read per sample) around the built train dataset where the config did
not, so a plain config needs none of them; `prepare_maps_in_workers` then hands the per-sample
spatial work (warp, foreground heatmap) to the loader workers.
"""

from __future__ import annotations

from typing import Any

from mmengine.logging import print_log

from .data import base_dataset, dataset_identity, unwrap_dataset_cfg
from .errors import ConfigError, StoreMismatch
from .replay import find_replay_dataset
from .store import fingerprint_tokens

INDEX_META_KEYS = ("sample_idx", "token")


def _pack_step(pipeline: Any):
    for step in getattr(pipeline, "transforms", []):
        if type(step).__name__ == "Pack3DDetInputs":
            return step
    return None


def check_index_meta(dataset: Any) -> None:
    """Every packed sample must carry sample_idx and token (the store row and its identity check):
    a Pack3DDetInputs that drops them (mmdet3d's default meta keys lack 'token') gets them added to
    the built pipeline, before any loader worker starts; a pipeline without the step is refused."""
    pack = _pack_step(dataset.pipeline)
    if pack is None:
        raise ConfigError("the train pipeline has no Pack3DDetInputs step: add "
                          "dict(type='Pack3DDetInputs', keys=[...], meta_keys=(..., 'sample_idx', 'token')) at its end.")
    missing = [k for k in INDEX_META_KEYS if k not in tuple(pack.meta_keys)]
    if missing:
        pack.meta_keys = tuple(pack.meta_keys) + tuple(missing)
        print_log(f"distillation: the train pipeline's Pack3DDetInputs now also keeps {missing} in each sample's "
                  "metainfo (the store row and its identity check)", logger="current")


def base_pipeline_cfg(dataset_cfg: Any) -> list:
    """The pipeline config of the base dataset under (config) wrappers."""
    return list(unwrap_dataset_cfg(dataset_cfg).get("pipeline") or []) if isinstance(dataset_cfg, dict) else []


def check_train_data(distiller: Any, dataset: Any, pipeline_cfg: list) -> None:
    """All data-side checks of a CRDDistiller; applies its augmentation policy to the built pipeline.
    `pipeline_cfg` is the base dataset's pipeline config (what the random-transform probe runs)."""
    base = base_dataset(dataset)
    tokens, _ = dataset_identity(base)
    if len(tokens) != distiller.num_data:
        where = f"the store {distiller.cache}" if distiller.cache else "the distiller's num_data"
        raise StoreMismatch(f"the training set has {len(tokens)} samples but {where} has {distiller.num_data} rows: "
                            + ("re-run `bevcache extract` on this dataset." if distiller.cache
                               else "set num_data to the training set's length."))
    if distiller.cache:
        mine = fingerprint_tokens(tokens)["sha256"]
        theirs = distiller.store_fingerprint.get("sha256")
        if mine != theirs:
            first = next((i for i, (a, b) in enumerate(zip(tokens, distiller.store_tokens, strict=True)) if a != b), 0)
            raise StoreMismatch(
                f"the training set is not the dataset the store {distiller.cache} was extracted from (token sha256 "
                f"{mine[:12]} vs {str(theirs)[:12]}; first different row {first}: {tokens[first]!r} vs "
                f"{distiller.store_tokens[first]!r}); re-run `bevcache extract` on this dataset.")
    check_index_meta(base)
    _apply_augmentation_policy(distiller, dataset, base, pipeline_cfg)
    _check_rows_wrapper(distiller, dataset)


def rows_read_per_sample(distiller: Any) -> tuple[list[str], list[str]]:
    """(spatial, pooled) teacher layers the loader reads per sample: spatial maps, and pooled tables
    too large for memory."""
    spatial = sorted(set(distiller.spatial_cfg.get("layers", {}).values())) if distiller.cache else []
    pooled = sorted(set(distiller.layers.values())) if distiller.lazy_pooled else []
    return spatial, pooled


def add_wrappers(distiller: Any, dataset: Any, pipeline_cfg: list, seed: int | None) -> Any:
    """The built train dataset with the wrappers `distiller` reads through, added where the config has
    none: ReplayViewsDataset right around the base dataset (inside CBGS/Repeat wrappers) when it replays
    views, TeacherRowsDataset around the whole when the loader reads teacher rows per sample.
    Returns the outermost dataset: `dataset` itself, or a new wrapper around it."""
    from .loading import TeacherRowsDataset, find_rows_dataset
    from .replay import ReplayViewsDataset

    top = dataset
    if distiller.augmentation == "replay" and find_replay_dataset(dataset) is None:
        base = base_dataset(dataset)
        if hasattr(base, "filter_empty_gt"):
            base.filter_empty_gt = False  # every view must exist, as it did when the teacher saw it
        replay = ReplayViewsDataset(base, seed=0 if seed is None else int(seed),
                                    pipeline_cfg=pipeline_cfg)  # what the store's record is compared with
        parent = dataset
        while parent is not base and getattr(parent, "dataset", None) is not base:
            parent = parent.dataset
        if parent is base:
            top = replay
        else:
            parent.dataset = replay
    spatial, pooled = rows_read_per_sample(distiller)
    if (spatial or pooled) and find_rows_dataset(top) is None:
        top = TeacherRowsDataset(top, cache=distiller.cache, spatial=spatial, pooled=pooled)
    return top


def prepare_maps_in_workers(distiller: Any, dataset: Any) -> None:
    """Have TeacherRowsDataset's loader workers warp and weigh each sample's spatial maps with the
    distiller's settings (the main process then only stacks them), unless the config chose settings
    itself (the distiller refuses settings other than its own). Call it after `attach_train_data`,
    which fixes the warp's augmentation order, and before the loader's workers start."""
    from .loading import find_rows_dataset

    rows = find_rows_dataset(dataset)
    if rows is not None and rows.spatial and rows.prepare is None and distiller.spatial_cfg and distiller.cache:
        rows.prepare_spatial(distiller.spatial_loader_settings())


def _check_rows_wrapper(distiller: Any, dataset: Any) -> None:
    """Spatial maps (and pooled tables too large for memory) come from TeacherRowsDataset."""
    from .loading import find_rows_dataset

    spatial, pooled = rows_read_per_sample(distiller)
    if not spatial and not pooled:
        return
    rows = find_rows_dataset(dataset)
    how = (f"remove the wrapper (DistillationHook adds the right one) or make it "
           f"dict(type='TeacherRowsDataset', dataset=<it>, cache={distiller.cache!r}, spatial={spatial}, "
           f"pooled={pooled}).")
    if rows is None:
        raise ConfigError(f"the distiller reads teacher rows {spatial + pooled} per sample, but the train dataset has "
                          f"no TeacherRowsDataset to read them in the loader workers: {how}")
    if rows.cache != distiller.cache or not set(spatial) <= set(rows.spatial) or not set(pooled) <= set(rows.pooled):
        raise ConfigError(f"TeacherRowsDataset reads {rows.spatial} / {rows.pooled} from {rows.cache}, but the "
                          f"distiller needs {spatial} / {pooled} from {distiller.cache}: {how}")


def _check_warp_record(base: Any, order: tuple[str, ...]) -> None:
    """Every key the warp reads must survive Pack3DDetInputs, or a flip would be lost silently."""
    from .warp import RECORDERS

    kinds = {RECORDERS[n][0] for n in order}
    needed = []
    if kinds & {"keyed", "both"}:
        needed += ["transformation_3d_flow", "pcd_rotation", "pcd_scale_factor", "pcd_trans"]
    if kinds & {"matrix", "both"}:
        needed.append("lidar_aug_matrix")
    pack = _pack_step(base.pipeline)
    missing = [k for k in needed if pack is not None and k not in tuple(pack.meta_keys)]
    if missing:
        raise ConfigError(f"augmentation='warp' reads each sample's augmentation record, but the train pipeline's "
                          f"Pack3DDetInputs drops {missing} ({list(order)} record there): add them to its meta_keys.")


def _check_warpable(distiller: Any, base: Any, random_names: list[str]) -> None:
    """'warp' keeps every transform: refuse those a BEV warp cannot express, unless told to ignore them."""
    from .warp import BEV_EFFECT, augmentation_order, non_warpable

    if not distiller.spatial_cfg:
        raise ConfigError("augmentation='warp' warps cached BEV maps: it needs spatial=dict(...) layers; for pooled "
                          "CRD use 'keep' (pooling is nearly invariant to flips/rotations) or 'replay'.")
    names = [type(t).__name__ for t in getattr(base.pipeline, "transforms", [])]
    distiller.augmentation_order = augmentation_order(names)  # any mix of mmdet3d's and BEVFusion's transforms
    _check_warp_record(base, distiller.augmentation_order)
    bad = non_warpable(names)
    bad.update({n: "a random transform bevcache does not know how to warp" for n in random_names
                if n not in BEV_EFFECT and n not in bad})
    if bad and not distiller.spatial_cfg["ignore_non_warpable"]:
        raise ConfigError("augmentation='warp' cannot express these train transforms as a BEV warp: "
                          + "; ".join(f"{n} ({why})" for n, why in bad.items())
                          + ". Remove them from the student's train pipeline, or set "
                          "spatial=dict(..., ignore_non_warpable=True) to distil against the warped map anyway.")
    if bad:
        print_log(f"distillation: warping cached maps although {sorted(bad)} change the input in ways a warp "
                  "cannot follow (spatial.ignore_non_warpable=True)", logger="current", level=30)
    print_log(f"distillation: cached BEV maps are warped into each sample's augmented frame ({random_names})",
              logger="current")


def _apply_augmentation_policy(distiller: Any, dataset: Any, base: Any, pipeline_cfg: list) -> None:
    from mmengine.dataset import Compose

    from .pipeline import random_steps, strip_steps

    replay = find_replay_dataset(dataset)
    policy = distiller.augmentation
    if policy == "replay":
        if replay is None:
            raise ConfigError(
                "augmentation='replay' needs the base train dataset wrapped in ReplayViewsDataset "
                "(DistillationHook adds it before checking the data: call wiring.add_wrappers first).")
        if distiller.cache:
            replay.bind(num_views=distiller.num_views, recorded=distiller.view_record, where=distiller.cache)
        else:
            views = distiller.num_views or replay.num_views
            if not views:
                raise ConfigError("augmentation='replay' with an online teacher needs views=K (K >= 1) on the "
                                  "distiller: the number of augmented views to draw from.")
            replay.bind(num_views=views, recorded=None, where="the online teacher")
        print_log(f"distillation: replaying {replay.num_views} augmented views per sample", logger="current")
        return
    if replay is not None:
        raise ConfigError(f"the train dataset is wrapped in ReplayViewsDataset but augmentation={policy!r}: "
                          "set augmentation='replay', or remove the wrapper.")
    steps = random_steps(pipeline_cfg, base)
    names = [s.type for s in steps]
    if policy == "warp":
        _check_warpable(distiller, base, names)
        return
    if not steps:
        return
    if policy == "drop":
        base.pipeline = Compose(strip_steps(pipeline_cfg, steps))  # loader workers start after this
        print_log(f"distillation: DROPPED the random train transforms {names} (augmentation='drop'): the student "
                  "trains without augmentation. Measured cost (docs/quality/report.md): cached CRD without "
                  "augmentation reached 0.228 mAP where the plain augmented student reached 0.391; the default "
                  "'auto' keeps them (or replays/warps the cache)", logger="current", level=30)
    elif distiller.cache:
        print_log(f"distillation: keeping the random train transforms {names} although the cached teacher "
                  "features describe the un-augmented sample (augmentation='keep'); 'replay' avoids that",
                  logger="current", level=30)
    else:
        print_log(f"distillation: keeping the random train transforms {names}; the online teacher sees the same "
                  "augmented batch (augmentation='keep')", logger="current")
