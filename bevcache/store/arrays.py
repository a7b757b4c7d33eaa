"""The zarr arrays of one opened store: opened lazily and checked against its layout, read whole,
block by block or row by row, with unreadable rows reported instead of raised."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import zarr
from zarr.core.sync import sync

from ..errors import StoreError
from .layout import Layout
from .messages import RECREATE, chunk_reason, damage_text, why

READ_BYTES = 64 << 20  # one read of a large (spatial) array holds at most about this much


class Arrays:
    """Checked access to the arrays of the group at url; a damaged chunk is (start, stop, reason)."""

    def __init__(self, url: str, group: zarr.Group, layout: Layout) -> None:
        self.url, self.group, self.layout = url, group, layout
        self._open: dict[str, zarr.Array] = {}

    def get(self, path: str) -> zarr.Array:
        """The array at path, or a StoreError if it is missing or not what the metadata says."""
        if path not in self._open:
            try:
                arr = self.group[path]
            except KeyError:
                raise StoreError(f"array {path} is missing from store {self.url}: {RECREATE}.") from None
            except Exception as exc:
                raise StoreError(f"the metadata of array {path} in store {self.url} is unreadable ({why(exc)}): "
                                 f"{RECREATE}.") from None
            if not self.layout.matches(arr, path):
                shape, dtype, chunks, shards = self.layout.expected(path)
                raise StoreError(
                    f"array {path} of store {self.url} does not match the store's metadata (expected shape {shape} "
                    f"{dtype}, chunks {chunks}, shards {shards}; found {getattr(arr, 'shape', arr)} "
                    f"{getattr(arr, 'dtype', '')}, chunks {getattr(arr, 'chunks', '')}, shards "
                    f"{getattr(arr, 'shards', '')}): {RECREATE}."
                )
            self._open[path] = arr  # type: ignore[assignment]  # layout.matches: an Array
        return self._open[path]

    def read(self, path: str) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """Whole array in one call; if that fails, block by block to find the bad [start, stop) blocks
        (which read as the fill value)."""
        arr = self.get(path)
        try:
            return np.asarray(arr[...]), []
        except Exception:
            pass
        out = np.empty(arr.shape, dtype=arr.dtype)
        bad = []
        for s, e in self.layout.blocks():
            try:
                out[s:e] = arr[s:e]
            except Exception as exc:
                out[s:e] = arr.fill_value
                bad.append((s, e, chunk_reason(exc)))
        return out, bad

    def read_whole(self, path: str) -> np.ndarray:
        """Whole array, or a StoreError naming the damaged rows (for tokens, sample_idx, digests)."""
        data, bad = self.read(path)
        if bad:
            raise StoreError(damage_text(self.url, path, bad, consequence=RECREATE))
        return data

    def scan(self, path: str) -> Iterator[tuple[int, np.ndarray, list[tuple[int, int, str]]]]:
        """(start, rows, bad) for consecutive row groups of at most ~READ_BYTES, never straddling a block:
        what verify reads a large array with. A group that fails is retried row by row, so `bad`
        names single rows (which read as the fill value)."""
        arr = self.get(path)
        row_bytes = max(1, int(np.prod(arr.shape[1:])) * arr.dtype.itemsize)
        step = max(1, READ_BYTES // row_bytes)
        for start, stop in self.layout.blocks():
            for s in range(start, stop, step):
                e = min(s + step, stop)
                try:
                    yield s, np.asarray(arr[s:e]), []
                    continue
                except Exception:
                    pass
                rows, bad = self.rows(path, [(r,) for r in range(s, e)])
                yield s, rows, bad

    def rows(self, path: str, keys: list[tuple[int, ...]]) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
        """arr[key] for each key (a row, or (row, view index)), one inner chunk each; unreadable keys
        give the fill value and a (row, row + 1, reason) entry."""
        arr = self.get(path)
        cut = len(keys[0]) if keys else 1
        out = np.empty((len(keys), *arr.shape[cut:]), dtype=arr.dtype)
        bad = []
        for i, key in enumerate(keys):
            try:
                out[i] = arr[key]
            except Exception as exc:
                out[i] = arr.fill_value
                bad.append((int(key[0]), int(key[0]) + 1, chunk_reason(exc)))
        return out, bad

    def drop_block(self, path: str, start: int) -> None:
        """Delete the stored object (chunk or shard) holding block `start` of a row array.

        Writing into a sharded array merges with the shard already stored, so a shard torn by a
        kill would make the rewrite fail its checksum: the block's old shard goes first."""
        arr = self.get(path)
        coords = (start // self.layout.chunk_rows,) + (0,) * (arr.ndim - 1)
        where = arr.store_path
        sync(where.store.delete(f"{where.path}/{arr.metadata.encode_chunk_key(coords)}"))
