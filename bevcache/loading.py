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
"""

from __future__ import annotations

import os
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


@DATASETS.register_module()
class TeacherRowsDataset:
    """Wraps a train dataset: each packed sample also carries its teacher rows, read from `cache`."""

    def __init__(self, dataset: dict | Any, cache: str, spatial: list[str] | tuple[str, ...] = (),
                 pooled: list[str] | tuple[str, ...] = ()) -> None:
        self.dataset = DATASETS.build(dataset) if isinstance(dataset, dict) else dataset
        self.cache = str(cache)
        self.spatial = list(spatial)
        self.pooled = list(pooled)
        self._store = None
        self._pid: int | None = None

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
        row = np.asarray([int(sample.metainfo["sample_idx"])])
        view = int(sample.metainfo.get(VIEW_META, 0))
        store = self._opened()
        for layer in self.spatial:
            value = store.read_spatial(layer, row, views=None if not view else np.asarray([view]))[0]
            sample.set_field(torch.from_numpy(np.ascontiguousarray(value)), map_field(layer))
        for layer in self.pooled:  # (the distiller keeps replayed views' vectors in memory)
            value = store.read_rows(layer, row)[0]
            sample.set_field(torch.from_numpy(np.ascontiguousarray(value)), vec_field(layer))
        return packed

    def __getattr__(self, name: str) -> Any:  # metainfo, get_data_info, get_cat_ids, full_init, ...
        if name in ("dataset", "_store", "_pid"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getstate__(self) -> dict:  # an open store never crosses a process boundary
        return {**self.__dict__, "_store": None, "_pid": None}


def find_rows_dataset(dataset: Any) -> TeacherRowsDataset | None:
    """The TeacherRowsDataset inside (or being) a possibly wrapped dataset."""
    from .data import find_wrapper

    return find_wrapper(dataset, TeacherRowsDataset)
