"""The teacher feature store: pooled vectors (and optionally unpooled spatial maps) per sample and
layer in a Zarr v3 group. Row i holds base-dataset index i.

Layout under `url` (a local path or any fsspec URL, e.g. s3://); `layout.py` lists every array:

    zarr.json          group attrs["bevcache"]: format_version, num_samples, chunk_rows, dtype,
                       layers, spatial, views, dataset fingerprint, teacher, split, created, finished, ...
    features/<layer>   [N, dim]            views/<layer>          [N, K, dim]   (K > 0)
    spatial/<layer>    float16 [N, C, h, w], sharded: one shard per block, one inner chunk per sample
    spatial_views/<layer> [N, K, C, h, w]  view_digests           int64 [N, K]  (K > 0)
    complete           uint8 [N]: 1 where a row is durable;  tokens, sample_idx

Guarantees. Every chunk is checksummed (CRC32C), so a damaged chunk is reported as a StoreError
naming the array and rows, never read as data; a chunk never written reads as NaN, which writing
refuses to store. Writing happens in chunk-aligned row blocks (`blocks()`): `write_block` writes
every array's chunk (or shard) of the block and only then the block's `complete` chunk, so a kill
-9 at any moment loses at most the block being written. Several processes may write disjoint
blocks at once (no two touch the same object); only the creator may call `create_store` and
`set_attrs` (zarr rewrites zarr.json whole).

Modules: spec (what a store holds), location (URLs, opening, the writer lock), layout (arrays and
encoding), arrays (checked reads), writing (one block), observers (callbacks after each durable
block), inspect (verify, info), feature_store (FeatureStore, open_store), create (create_store).
"""

from .create import create_store, open_store
from .feature_store import FeatureStore
from .location import exclusive_writer, store_exists
from .observers import add_write_observer, remove_write_observer
from .spec import (
    DTYPES,
    FORMAT_VERSION,
    POOLINGS,
    RESERVED,
    LayerSpec,
    SpatialSpec,
    fingerprint_tokens,
)

__all__ = [
    "DTYPES", "FORMAT_VERSION", "POOLINGS", "RESERVED", "FeatureStore", "LayerSpec", "SpatialSpec",
    "add_write_observer", "create_store", "exclusive_writer", "fingerprint_tokens", "open_store",
    "remove_write_observer", "store_exists",
]
