"""Teacher rows read lazily inside the dataloader workers: `TeacherRowsDataset`.

Spatial maps (`[C, h, w]` per sample) are far too large to hold for a whole dataset in memory
(nuScenes at 512 x 90 x 90 float16: 28k x 8.3 MB), so each sample's map is read from the store
by the loader worker that prepares the sample, one inner chunk per map, local disk or S3 alike;
each worker process opens the store once. The pooled vectors stay an in-memory table in the
distiller while the table is small (`POOLED_IN_MEMORY_BYTES`); above that they are read here too.
The choice is made by the distiller and logged.

The wrapper may sit anywhere in the dataset chain (outside CBGS/Repeat and replay alike): it reads
the row (`sample_idx`) and the view (`replay_view`) from each packed sample's metainfo, so what it
attaches always belongs to the sample the student sees. Each layer arrives as a data field of the
Det3DDataSample, `teacher_map__<layer>` ([C, h, w] float16) or `teacher_vec__<layer>` ([dim]),
and is moved to the device with the batch by mmengine's data preprocessor.

With `prepare` settings (`SpatialPrep`: the distiller's `spatial_loader_settings()`), the workers
also do the per-sample part of spatial distillation, which depends only on the sample's metainfo
and GT boxes: the warp of its map into its augmented frame (augmentation='warp': the map then
arrives warped, float32, with `teacher_valid__<layer>` [1, h, w]) and its foreground heatmap
`teacher_fg__<layer>` [h, w]; the sample's metainfo records the settings used (`PREP_META`), which
the distiller checks against its own. The main process only stacks them (it used to compute them
there, one sample after the other, inside the training step).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from mmdet3d.registry import DATASETS

from .errors import ConfigError
from .replay import VIEW_META

POOLED_IN_MEMORY_BYTES = 2 * 1024**3  # pooled tables above this are read per sample instead


def reads_pooled_lazily(store, layers: set[str] | list[str], *, replay: bool) -> tuple[bool, int]:
    """(read per sample?, bytes of the in-memory table) for these pooled layers of a store. Replayed
    views stay in memory (the lookup by view is on the training device)."""
    itemsize = 2 if store.dtype == "float16" else 4
    size = sum(store.layers[t].dim for t in set(layers) if t in store.layers) * store.num_samples * itemsize
    size *= 1 + (store.num_views if replay else 0)
    return size > POOLED_IN_MEMORY_BYTES and not replay, size


def map_field(layer: str) -> str:
    return "teacher_map__" + layer.replace(".", "__")


def vec_field(layer: str) -> str:
    return "teacher_vec__" + layer.replace(".", "__")


def valid_field(layer: str) -> str:
    return "teacher_valid__" + layer.replace(".", "__")


def fg_field(layer: str) -> str:
    return "teacher_fg__" + layer.replace(".", "__")


PREP_META = "teacher_prep"  # metainfo: SpatialPrep.key() of the settings a worker prepared the sample with


@dataclass(frozen=True)
class SpatialPrep:
    """What the loader workers do to each sample's teacher maps before the step."""

    bev_range: tuple[float, float, float, float]  # metres (x_min, y_min, x_max, y_max) the maps cover
    warp: bool  # warp each map into the sample's augmented frame (augmentation='warp')
    order: tuple[str, ...] | None = None  # the pipeline's augmentation recorders (warp.augmentation_order)
    min_radius: int = 2  # gaussian_foreground's settings
    overlap: float = 0.1

    @classmethod
    def of(cls, settings: SpatialPrep | Mapping[str, Any]) -> SpatialPrep:
        if isinstance(settings, SpatialPrep):
            return settings
        unknown = set(settings) - {"bev_range", "warp", "order", "min_radius", "overlap"}
        if unknown or "bev_range" not in settings or "warp" not in settings:
            raise ConfigError(f"TeacherRowsDataset: prepare must be a dict with bev_range and warp (and optionally "
                              f"order, min_radius, overlap). Got {dict(settings)!r}.")
        order = settings.get("order")
        return cls(bev_range=tuple(float(v) for v in settings["bev_range"]),  # type: ignore[arg-type]
                   warp=bool(settings["warp"]), order=None if order is None else tuple(order),
                   min_radius=int(settings.get("min_radius", 2)), overlap=float(settings.get("overlap", 0.1)))

    def key(self) -> tuple:
        """A plain, comparable record of these settings (travels in each sample's metainfo)."""
        return (self.bev_range, self.warp, self.order if self.warp else None, self.min_radius, self.overlap)


def prepare_maps(sample: Any, maps: Mapping[str, np.ndarray], prep: SpatialPrep) -> None:
    """Attach each layer's map to `sample` as the distiller consumes it (see the module docstring):
    warped into the sample's augmented frame when prep.warp, with its valid mask and the foreground
    heatmap of the sample's GT boxes on the map's grid. Exactly what the main process computed on
    the batch, one sample at a time."""
    from .warp import bev_transform, gaussian_foreground, warp_bev

    transform = None
    if prep.warp:  # float32, as the main process made it from the float64 record
        transform = torch.as_tensor(bev_transform(sample.metainfo, prep.order)[None], dtype=torch.float32)
    heatmaps: dict[tuple[int, int], torch.Tensor] = {}  # one per grid size
    for layer, value in maps.items():
        teacher = torch.from_numpy(np.ascontiguousarray(value))  # [C, h, w] float16
        h, w = teacher.shape[-2:]
        if transform is not None:
            warped, valid = warp_bev(teacher[None].float(), transform, prep.bev_range)  # [1, C, h, w], [1, 1, h, w]
            teacher = warped[0]
            sample.set_field(valid[0], valid_field(layer))
        if (h, w) not in heatmaps:
            heatmaps[(h, w)] = gaussian_foreground(sample.gt_instances_3d.bboxes_3d, prep.bev_range, (h, w),
                                                   min_radius=prep.min_radius, overlap=prep.overlap)
        sample.set_field(heatmaps[(h, w)], fg_field(layer))
        sample.set_field(teacher, map_field(layer))
    sample.set_metainfo({PREP_META: prep.key()})


@DATASETS.register_module()
class TeacherRowsDataset:
    """Wraps a train dataset: each packed sample also carries its teacher rows, read from `cache`."""

    def __init__(self, dataset: dict | Any, cache: str, spatial: list[str] | tuple[str, ...] = (),
                 pooled: list[str] | tuple[str, ...] = (), prepare: SpatialPrep | Mapping[str, Any] | None = None
                 ) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.cache = str(cache)
        self.spatial = list(spatial)
        self.pooled = list(pooled)
        self.prepare: SpatialPrep | None = None
        if prepare is not None:
            self.prepare_spatial(prepare)
        self._store = None
        self._pid: int | None = None

    def prepare_spatial(self, settings: SpatialPrep | Mapping[str, Any] | None) -> None:
        """Have the workers warp and weigh each sample's maps (None: attach them as read). Call it
        before the loader's workers start (they keep the dataset they were given). Without an
        `order`, a warp takes the augmentation order of the wrapped dataset's own pipeline."""
        prep = None if settings is None else SpatialPrep.of(settings)
        if prep is not None and prep.warp and prep.order is None:
            from dataclasses import replace

            from .data import base_dataset
            from .warp import augmentation_order

            names = [type(t).__name__ for t in getattr(base_dataset(self.dataset).pipeline, "transforms", [])]
            prep = replace(prep, order=augmentation_order(names))
        self.prepare = prep

    def _opened(self):
        if self._store is None or self._pid != os.getpid():  # one handle per loader worker process
            from .store import open_store

            self._store = open_store(self.cache)
            self._pid = os.getpid()
        return self._store

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        packed = self.dataset[index]
        sample = packed["data_samples"]
        if "sample_idx" not in sample.metainfo:
            raise ConfigError("samples carry no 'sample_idx' in their metainfo: keep 'sample_idx' and 'token' in "
                              "Pack3DDetInputs.meta_keys of the train pipeline.")
        row = int(sample.metainfo["sample_idx"])
        view = int(sample.metainfo.get(VIEW_META, 0))
        maps = {layer: self.read_map(layer, row, view) for layer in self.spatial}
        if self.prepare is not None:
            prepare_maps(sample, maps, self.prepare)
        else:
            for layer, value in maps.items():
                sample.set_field(torch.from_numpy(np.ascontiguousarray(value)), map_field(layer))
        for layer in self.pooled:  # (the distiller keeps replayed views' vectors in memory)
            value = self._opened().read_rows(layer, np.asarray([row]))[0]
            sample.set_field(torch.from_numpy(np.ascontiguousarray(value)), vec_field(layer))
        return packed

    def read_map(self, layer: str, row: int, view: int = 0) -> np.ndarray:
        """float16 [C, h, w]: the store's map of (row, view) (0: the un-augmented sample)."""
        views = None if not view else np.asarray([view])
        return self._opened().read_spatial(layer, np.asarray([row]), views=views)[0]

    def __getattr__(self, name: str) -> Any:  # metainfo, get_data_info, get_cat_ids, full_init, ...
        if name in ("dataset", "_store", "_pid") or name.startswith("__"):  # e.g. never the inner __setstate__
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict:  # an open store never crosses a process boundary
        return {**self.__dict__, "_store": None, "_pid": None}


def find_rows_dataset(dataset: Any) -> TeacherRowsDataset | None:
    """The TeacherRowsDataset inside (or being) a possibly wrapped dataset."""
    from .data import find_wrapper

    return find_wrapper(dataset, TeacherRowsDataset)
