"""Creating and opening stores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

import numpy as np
import zarr

from ..errors import ConfigError, StoreError
from .feature_store import FeatureStore, open_store  # noqa: F401  (open_store: re-exported)
from .layout import Layout
from .location import holds_anything, make_store, store_exists
from .spec import (
    RESERVED,
    LayerSpec,
    SpatialSpec,
    check_json,
    fingerprint_tokens,
    parse_dtype,
    parse_spatial,
)


def _count(value: object, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        kind = "positive" if minimum else "non-negative"
        raise ConfigError(f"{what} must be a {kind} integer. Got {value!r}.")
    return int(value)


def create_store(
    url: str,
    *,
    num_samples: int,
    layers: list[LayerSpec],
    dtype: str,
    tokens: list[str],
    sample_idx: list[int],
    metadata: dict,
    chunk_rows: int = 256,
    overwrite: bool = False,
    storage_options: dict | None = None,
    views: int = 0,
    spatial: Mapping[str, Sequence[int]] | Sequence[SpatialSpec] | None = None,
) -> FeatureStore:
    """Create an empty store for num_samples rows of the given pooled layers, `views` augmented
    views per row, and the unpooled maps of the `spatial` layers ({layer: (C, h, w)}, float16);
    returns it opened r+."""
    dtype = parse_dtype(dtype)
    num_samples = _count(num_samples, "num_samples", 1)
    chunk_rows = _count(chunk_rows, "chunk_rows", 1)
    views = _count(views, "views", 0)
    layers, spatial_specs = list(layers), parse_spatial(spatial)
    if not all(isinstance(s, LayerSpec) for s in layers) or not (layers or spatial_specs):
        raise ConfigError(f"layers must be a list of LayerSpec, non-empty unless spatial layers are given. Got {layers!r}.")
    arrays = [s.array_name for s in layers]
    if len(set(arrays)) != len(arrays):
        raise ConfigError(f"layer names must be distinct (after '.' -> '__'). Got {[s.name for s in layers]}.")
    tokens = [str(t) for t in tokens]
    if len(tokens) != num_samples or len(sample_idx) != num_samples:
        raise ConfigError(f"tokens and sample_idx must have num_samples={num_samples} entries. "
                          f"Got {len(tokens)} tokens and {len(sample_idx)} sample_idx.")
    if any("\x00" in t for t in tokens):
        raise ConfigError("sample tokens must not contain NUL characters (they pad the tokens array).")
    metadata = check_json(dict(metadata), "metadata")
    clash = sorted(set(metadata) & set(RESERVED))
    if clash:
        raise ConfigError(f"metadata may not set the store's own keys {clash}: they come from the arguments.")
    dataset = dict(metadata.get("dataset") or {})
    for key, value in fingerprint_tokens(tokens).items():
        if key in dataset and dataset[key] != value:
            raise ConfigError(f"metadata['dataset'][{key!r}] = {dataset[key]!r} but the tokens passed give {value!r}: "
                              "pass the fingerprint of these tokens (fingerprint_tokens(tokens)).")
        dataset[key] = value

    if holds_anything(url, storage_options):
        if not store_exists(url, storage_options=storage_options):
            raise StoreError(f"{url} is not empty and holds no zarr store: refusing to write there; choose another URL.")
        if not overwrite:
            raise StoreError(f"{url} already holds a store: pass overwrite=True (`bevcache extract --overwrite`) to "
                             "replace it, or open_store(url, mode='r+') (`--resume`) to continue it.")

    token_bytes = [t.encode("utf-8") for t in tokens]
    width = max(1, max(len(b) for b in token_bytes))
    meta = {
        **metadata,
        # Version 2 only when needed: a bevcache that predates spatial layers must refuse to resume
        # such a store (it would mark rows complete without their maps); others stay readable by it.
        "format_version": 2 if spatial_specs else 1,
        "num_samples": num_samples,
        "chunk_rows": chunk_rows,
        "dtype": dtype,
        "layers": [{"name": s.name, "array": s.array_name, "dim": int(s.dim), "pooling": s.pooling} for s in layers],
        "token_width": width,
        "views": views,
        **({"spatial": [s.to_json() for s in spatial_specs]} if spatial_specs else {}),
        "dataset": dataset,
        "created": metadata.get("created") or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "finished": metadata.get("finished"),
        "layout_ready": False,  # set once every array exists, so an interrupted create is recognised
    }
    layout = Layout.from_meta(meta)
    token_table = np.zeros((num_samples, width), dtype=np.uint8)
    for i, b in enumerate(token_bytes):
        token_table[i, : len(b)] = np.frombuffer(b, dtype=np.uint8)
    store = make_store(url, read_only=False, storage_options=storage_options)
    group = zarr.open_group(store=store, mode="w" if overwrite else "w-", zarr_format=3, attributes={"bevcache": meta})
    layout.create_arrays(group, tokens=token_table, sample_idx=np.asarray(sample_idx, dtype=np.int64))
    meta["layout_ready"] = True
    group.attrs["bevcache"] = meta
    return FeatureStore(url, group=group, mode="r+", storage_options=storage_options)
