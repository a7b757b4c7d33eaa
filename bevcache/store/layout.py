"""The arrays of a store, derived from its metadata alone, and how each is encoded.

    features/<layer>        float16|float32 [N, dim], chunks (chunk_rows, dim)
    views/<layer>           [N, K, dim], chunks (chunk_rows, K, dim)            (K > 0 only)
    view_digests            int64 [N, K]                                       (K > 0 only)
    spatial/<layer>         float16 [N, C, h, w], sharded: shards (S, C, h, w), one inner chunk per
                            sample (1, C, h, w)
    spatial_views/<layer>   float16 [N, K, C, h, w], shards (S, 1, C, h, w): one per S rows and view,
                            inner chunks (1, 1, C, h, w): one per (sample, view)              (K > 0 only)
    S = the largest divisor of chunk_rows whose maps fit SHARD_BYTES, so a shard never spans blocks
    complete                uint8 [N], chunks (chunk_rows,)
    tokens                  uint8 [N, L]; sample_idx int64 [N]

Shards are bounded, not block-wide: zarr 3.0 builds a shard by appending each inner chunk to one
buffer (a copy of everything before it), so writing costs the square of the chunks per shard. 64 rows
x 20 views of 512x32x32 maps took 260 s in one shard per block, 23 s in a shard per view, 14 s in
shards of 16 rows (measured on 2 cores). Stores written with one shard per block
((chunk_rows, C, h, w), (chunk_rows, K, C, h, w)) are read and resumed as they are.

Every chunk (and inner chunk) is bytes -> Blosc(zstd, 5, bitshuffle) -> CRC32C; a shard's index is
bytes -> CRC32C (zarr's default index codecs). Row data arrays have fill value NaN, so a chunk
that was never written reads as NaN, which writing refuses to store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec

from .spec import SPATIAL_DTYPE, LayerSpec, SpatialSpec, parse_dtype

SHARD_BYTES = 16 << 20  # raw map bytes per shard, at most (unless one map is larger)


def shard_rows(chunk_rows: int, map_bytes: int) -> int:
    """Rows per shard: the largest divisor of chunk_rows whose maps fit SHARD_BYTES (at least 1)."""
    fit = max(1, SHARD_BYTES // max(1, map_bytes))
    return max(d for d in range(1, chunk_rows + 1) if chunk_rows % d == 0 and d <= fit)


def codecs() -> dict[str, Any]:
    """create_array keywords: zarr's default v3 encoding has no checksum; CRC32C goes last so it
    covers the compressed bytes."""
    return dict(serializer=BytesCodec(), compressors=[BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),
                                                      Crc32cCodec()], filters=None)


@dataclass(frozen=True)
class Layout:
    """Shapes and names of every array, from attrs["bevcache"]."""

    num_samples: int
    chunk_rows: int
    dtype: str
    layers: dict[str, LayerSpec]
    spatial: dict[str, SpatialSpec]
    views: int
    token_width: int

    @classmethod
    def from_meta(cls, meta: dict) -> Layout:
        """Raises KeyError/TypeError/ValueError/ConfigError on garbled metadata."""
        return cls(
            num_samples=int(meta["num_samples"]), chunk_rows=int(meta["chunk_rows"]), dtype=parse_dtype(meta["dtype"]),
            layers={d["name"]: LayerSpec(name=d["name"], dim=int(d["dim"]), pooling=d["pooling"]) for d in meta["layers"]},
            spatial={d["name"]: SpatialSpec(d["name"], int(d["channels"]), int(d["height"]), int(d["width"]))
                     for d in meta.get("spatial") or []},
            views=int(meta.get("views", 0)), token_width=int(meta["token_width"]),
        )

    def blocks(self) -> list[tuple[int, int]]:
        n, c = self.num_samples, self.chunk_rows
        return [(s, min(s + c, n)) for s in range(0, n, c)]

    def row_arrays(self) -> list[str]:
        """Every array of per-row teacher data, in the order write_block writes them."""
        paths = [f"features/{s.array_name}" for s in self.layers.values()]
        paths += [f"views/{s.array_name}" for s in self.layers.values()] if self.views else []
        paths += [f"spatial/{s.array_name}" for s in self.spatial.values()]
        paths += [f"spatial_views/{s.array_name}" for s in self.spatial.values()] if self.views else []
        return paths

    def expected(self, path: str) -> tuple[tuple[int, ...], str, tuple[int, ...], tuple[int, ...] | None]:
        """(shape, dtype, chunks, shards or None) that the array at path must have."""
        n, c, k = self.num_samples, self.chunk_rows, self.views
        fixed = {"complete": ((n,), "uint8"), "tokens": ((n, self.token_width), "uint8"),
                 "sample_idx": ((n,), "int64"), "view_digests": ((n, k), "int64")}
        if path in fixed:
            shape, dtype = fixed[path]
            return shape, dtype, (c, *shape[1:]), None
        kind, name = path.split("/", 1)
        if kind in ("features", "views"):
            dim = next(s.dim for s in self.layers.values() if s.array_name == name)
            shape = (n, k, dim) if kind == "views" else (n, dim)
            return shape, self.dtype, (c, *shape[1:]), None
        grid = next(s.shape for s in self.spatial.values() if s.array_name == name)
        rows = shard_rows(c, int(np.prod(grid)) * np.dtype(SPATIAL_DTYPE).itemsize)
        if kind == "spatial_views":
            return (n, k, *grid), SPATIAL_DTYPE, (1, 1, *grid), (rows, 1, *grid)
        return (n, *grid), SPATIAL_DTYPE, (1, *grid), (rows, *grid)

    def matches(self, arr: Any, path: str) -> bool:
        """Whether an opened node is the array this layout expects at path."""
        shape, dtype, chunks, shards = self.expected(path)
        allowed = {shards}
        if path.startswith("spatial_views/"):  # or the block-wide shard of stores written before
            allowed.add((self.chunk_rows, self.views, *shape[2:]))
        elif path.startswith("spatial/"):
            allowed.add((self.chunk_rows, *shape[1:]))
        return (isinstance(arr, zarr.Array) and arr.shape == shape and arr.dtype == np.dtype(dtype)
                and tuple(arr.chunks) == chunks and (tuple(arr.shards) if arr.shards else None) in allowed)

    def create_arrays(self, group: zarr.Group, *, tokens: np.ndarray, sample_idx: np.ndarray) -> None:
        """Create every array in group (row data left unwritten) and fill tokens and sample_idx."""
        for spec in self.layers.values():
            self._create(group, f"features/{spec.array_name}", np.nan, {"layer": spec.name, "pooling": spec.pooling})
            if self.views:
                self._create(group, f"views/{spec.array_name}", np.nan, {"layer": spec.name, "pooling": spec.pooling})
        for sspec in self.spatial.values():
            self._create(group, f"spatial/{sspec.array_name}", np.nan, {"layer": sspec.name})
            if self.views:
                self._create(group, f"spatial_views/{sspec.array_name}", np.nan, {"layer": sspec.name})
        if self.views:
            self._create(group, "view_digests", 0)
        self._create(group, "complete", 0)
        self._create(group, "tokens", 0)[:] = tokens
        self._create(group, "sample_idx", 0)[:] = sample_idx

    def _create(self, group: zarr.Group, path: str, fill: Any, attributes: dict | None = None) -> zarr.Array:
        shape, dtype, chunks, shards = self.expected(path)
        return group.create_array(path, shape=shape, chunks=chunks, shards=shards, dtype=dtype, fill_value=fill,
                                  attributes=attributes, **codecs())
