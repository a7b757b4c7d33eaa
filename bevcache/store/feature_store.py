"""FeatureStore: one opened store. Metadata is read at open; arrays, tokens and sample_idx on first use."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from ..errors import ConfigError, StoreError, StoreMismatch
from . import inspect, writing
from .arrays import Arrays
from .layout import Layout
from .location import open_group
from .messages import damage_text, incomplete_text, rows_text, why
from .spec import FORMAT_VERSION, RESERVED, LayerSpec, check_json, decode_tokens

if TYPE_CHECKING:  # torch only where tables become tensors: `bevcache info`/`verify` never import it
    import torch


class FeatureStore:
    """An opened store (see bevcache.store for its layout and guarantees)."""

    def __init__(self, url: str, *, group: zarr.Group, mode: str, storage_options: dict | None = None) -> None:
        self.url = str(url)
        self._group, self._mode, self._storage_options = group, mode, storage_options
        meta = group.attrs.get("bevcache")
        if not isinstance(meta, dict):
            raise StoreError(f"{url} is a zarr group but not a bevcache store (no 'bevcache' attributes): "
                             "choose another URL or create the store with `bevcache extract`.")
        version = meta.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StoreError(f"store {url} has format_version {version!r}; this bevcache reads up to {FORMAT_VERSION}: "
                             "upgrade bevcache or re-create the store.")
        try:
            self.layout = Layout.from_meta(meta)
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise StoreError(f"the bevcache metadata of store {url} is garbled ({why(exc)}): re-create it with "
                             "`bevcache extract --overwrite`.") from None
        if not meta.get("layout_ready", False):
            raise StoreError(f"store {url} was never finished being created (its creation was interrupted): "
                             "re-create it with `bevcache extract --overwrite`.")
        self._meta = meta
        self.arrays = Arrays(self.url, group, self.layout)
        self.num_samples, self.chunk_rows, self.dtype = self.layout.num_samples, self.layout.chunk_rows, self.layout.dtype
        self.layers, self.spatial, self.num_views = self.layout.layers, self.layout.spatial, self.layout.views

    def __reduce__(self) -> tuple:
        # Pickled (e.g. into spawned loader workers) as its URL: the copy reopens the store.
        return _reopen, (self.url, self._mode, self._storage_options)

    def __repr__(self) -> str:
        return (f"FeatureStore({self.url!r}, mode={self._mode!r}, num_samples={self.num_samples}, "
                f"layers={list(self.layers)}, spatial={list(self.spatial)}, dtype={self.dtype!r})")

    # -- metadata ----------------------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        """A copy of the bevcache metadata (teacher, dataset, split, created, finished, ...)."""
        return copy.deepcopy(self._meta)

    @cached_property
    def tokens(self) -> list[str]:
        return decode_tokens(self.arrays.read_whole("tokens"))

    @cached_property
    def sample_idx(self) -> np.ndarray:
        return self.arrays.read_whole("sample_idx")

    def set_attrs(self, **kv: Any) -> None:
        """Merge kv into the bevcache metadata (e.g. finished=...). Creator process only."""
        self.require_writable()
        clash = sorted(set(kv) & set(RESERVED))
        if clash:
            raise ConfigError(f"set_attrs may not change the store's layout keys {clash}.")
        meta = {**self._meta, **check_json(kv, "set_attrs values")}
        try:
            self._group.attrs["bevcache"] = meta
        except Exception as exc:
            raise StoreError(f"could not write the metadata of store {self.url} ({why(exc)}).") from exc
        self._meta = meta

    # -- blocks and completeness -------------------------------------------------------------

    def blocks(self) -> list[tuple[int, int]]:
        """Chunk-aligned [start, stop) row blocks covering all rows."""
        return self.layout.blocks()

    def complete_mask(self) -> np.ndarray:
        """bool [num_samples]: rows whose features are durable. Damaged mask chunks count as not."""
        return self.read_mask()[0]

    def read_mask(self) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """(complete mask, unreadable mask blocks)."""
        data, bad = self.arrays.read("complete")
        return data == 1, bad

    def pending_blocks(self) -> list[tuple[int, int]]:
        """Blocks with at least one row not complete, in row order."""
        mask = self.complete_mask()
        return [(s, e) for s, e in self.blocks() if not mask[s:e].all()]

    def write_block(self, start: int, features: Mapping[str, Any], *, views: Mapping[str, Any] | None = None,
                    digests: Any = None, spatial: Mapping[str, Any] | None = None,
                    spatial_views: Mapping[str, Any] | None = None) -> None:
        """Write rows [start, start+n) of every layer (features[layer]: [n, dim]; with K views also
        views[layer] [n, K, dim] and digests [n, K]; with spatial layers spatial[layer] [n, C, h, w]
        and, with views, spatial_views[layer] [n, K, C, h, w]), then mark them complete and call
        the write observers (bevcache.store.observers)."""
        writing.write_block(self, start, features, views=views, digests=digests, spatial=spatial,
                            spatial_views=spatial_views)

    def reset_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Mark whole blocks not written, so pending_blocks() (and --resume) redoes them."""
        self.require_writable()
        valid = dict(self.blocks())
        for start, stop in blocks:
            if valid.get(start) != stop:
                raise StoreError(f"({start}, {stop}) is not a block of store {self.url}; blocks are FeatureStore.blocks().")
            self.arrays.get("complete")[start:stop] = 0

    # -- reading -----------------------------------------------------------------------------

    def read_table(self, layer: str, *, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None, allow_incomplete: bool = False,
                   views: bool = False) -> torch.Tensor:
        """The whole [num_samples, dim] table of a layer (views=True: its [num_samples, K, dim]
        augmented views), read in one bulk call. Raises StoreError if any row is not written yet
        (allow_incomplete=True returns them as NaN) or a chunk is damaged or missing."""
        path = self.view_path(layer) if views else self.feature_path(layer)
        mask, _ = self.read_mask()
        if not allow_incomplete and not mask.all():
            raise StoreError(incomplete_text(self.url, np.flatnonzero(~mask), self.num_samples))
        table, bad = self.arrays.read(path)
        bad = [b for b in bad if mask[b[0]:b[1]].any()]  # damage in unwritten rows is redone anyway
        if bad:
            raise StoreError(damage_text(self.url, path, bad))
        # A missing chunk reads as NaN (the fill value) in every column; write_block never stores NaN.
        self._refuse_lost(path, np.flatnonzero(np.isnan(table.reshape(len(table), -1)[:, 0]) & mask))
        import torch

        return torch.from_numpy(table).to(device=device, dtype=torch.float32 if dtype is None else dtype)

    def read_digests(self) -> np.ndarray:
        """int64 [num_samples, K]: the digest of each view's augmented input (see bevcache.replay)."""
        self._require_views()
        return self.arrays.read_whole("view_digests")

    def read_rows(self, layer: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a layer straight from the store (unwritten rows read as NaN)."""
        path = self.feature_path(layer)
        rows = self._rows(rows)
        try:
            return np.asarray(self.arrays.get(path).oindex[rows])
        except Exception as exc:
            raise StoreError(f"reading rows of array {path} of store {self.url} failed ({why(exc)}); "
                             "run `bevcache verify` to locate the damage.") from exc

    def read_spatial(self, layer: str, rows: Any, views: Any = None) -> np.ndarray:
        """float16 [len(rows), C, h, w]: the spatial maps of a few rows (views: one view number per
        row, 0 = the un-augmented sample, v = augmented view v). Each row reads only its own inner
        chunk (and its shard's index). Raises StoreError for rows not written, missing or damaged."""
        spec = self._spatial_spec(layer)
        rows = self._rows(rows)
        views = np.zeros_like(rows) if views is None else np.asarray(views, dtype=np.int64).reshape(-1)
        if views.shape != rows.shape or (views.size and (views.min() < 0 or views.max() > self.num_views)):
            raise StoreError(f"read_spatial on store {self.url}: views must give one view in [0, {self.num_views}] "
                             f"per row ({rows.size} rows). Got {views.tolist()[:8]}.")
        if rows.size:
            wanted = np.unique(rows)
            try:  # only the mask chunks of these rows
                done = np.asarray(self.arrays.get("complete").oindex[wanted]) == 1
            except Exception:  # a torn mask chunk: its rows count as not written
                done = self.complete_mask()[wanted]
            if not done.all():
                raise StoreError(incomplete_text(self.url, wanted[~done], self.num_samples))
        out = np.empty((rows.size, *spec.shape), dtype=np.float16)
        for augmented, path in ((False, f"spatial/{spec.array_name}"), (True, f"spatial_views/{spec.array_name}")):
            pick = np.flatnonzero((views > 0) == augmented)
            if pick.size == 0:
                continue
            keys: list[tuple[int, ...]] = [(int(rows[i]), int(views[i]) - 1) if augmented else (int(rows[i]),)
                                           for i in pick]
            out[pick], bad = self.arrays.rows(path, keys)
            if bad:
                raise StoreError(damage_text(self.url, path, sorted(set(bad))))
            self._refuse_lost(path, np.unique(rows[pick][np.isnan(out[pick].reshape(pick.size, -1)[:, 0])]))
        return out

    # -- checking ----------------------------------------------------------------------------

    def verify(self) -> list[str]:
        """Read every chunk of every array; return the problems found (empty if none)."""
        return inspect.verify(self)

    def info(self) -> dict:
        """Summary for humans and the CLI: completeness, layers, provenance and sizes."""
        return inspect.info(self)

    def check_matches(self, *, dataset: dict | None = None, teacher: dict | None = None,
                      layers: list[LayerSpec] | None = None, dtype: str | None = None,
                      views: int | None = None, augmentation: dict | None = None,
                      spatial: Any = None) -> None:
        """Raise StoreMismatch listing every way this store differs from what the caller expects.

        Only keys given in dataset/teacher are compared; stored layers beyond `layers` are fine;
        `spatial` ({layer: (C, h, w)} or SpatialSpecs) must equal the store's spatial layers."""
        diffs = inspect.differences(self, dataset=dataset, teacher=teacher, layers=layers, dtype=dtype,
                                    views=views, augmentation=augmentation, spatial=spatial)
        if diffs:
            raise StoreMismatch(
                f"store {self.url} was made for something else:\n  - " + "\n  - ".join(diffs)
                + "\nre-extract with `bevcache extract --overwrite`, or point to the matching store."
            )

    # -- shared with writing and inspect ------------------------------------------------------

    def require_writable(self) -> None:
        if self._mode != "r+":
            raise StoreError(f"store {self.url} was opened read-only: open it with open_store(url, mode='r+') to write.")

    def feature_path(self, layer: str) -> str:
        """features/<array> of a layer given by name or array name."""
        spec = self.layers.get(layer) or next((s for s in self.layers.values() if s.array_name == layer), None)
        if spec is None:
            raise StoreError(f"layer {layer!r} is not in store {self.url}; layers present: {list(self.layers)}.")
        return f"features/{spec.array_name}"

    def view_path(self, layer: str) -> str:
        self._require_views()
        return "views/" + self.feature_path(layer).split("/", 1)[1]

    def token_or_unknown(self, row: int) -> str:
        try:
            return repr(self.tokens[row])
        except StoreError:
            return "unknown"

    def _spatial_spec(self, layer: str):
        spec = self.spatial.get(layer) or next((s for s in self.spatial.values() if s.array_name == layer), None)
        if spec is None:
            raise StoreError(f"spatial layer {layer!r} is not in store {self.url}; spatial layers present: "
                             f"{list(self.spatial)} (extract them with spatial=...).")
        return spec

    def _require_views(self) -> None:
        if not self.num_views:
            raise StoreError(f"store {self.url} has no augmented views (it was extracted without --views); "
                             "re-extract with `bevcache extract --views K` to replay augmentation.")

    def _rows(self, rows: Any) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise StoreError(f"rows must lie in [0, {self.num_samples}) for store {self.url}. Got {rows.min()}..{rows.max()}.")
        return rows

    def _refuse_lost(self, path: str, lost: np.ndarray) -> None:
        if lost.size:
            raise StoreError(
                f"array {path} of store {self.url}: rows {rows_text(lost)} are marked complete but hold "
                "no data (chunk files missing); run `bevcache verify`, then reset those blocks and resume."
            )


def open_store(url: str, *, mode: str = "r", storage_options: dict | None = None) -> FeatureStore:
    """Open an existing store ("r" read-only, "r+" to write blocks); reads metadata only."""
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be one of ['r', 'r+']. Got {mode!r}.")
    group = open_group(url, mode=mode, storage_options=storage_options)
    return FeatureStore(url, group=group, mode=mode, storage_options=storage_options)


def _reopen(url: str, mode: str, storage_options: dict | None) -> FeatureStore:
    return open_store(url, mode=mode, storage_options=storage_options)
