"""Writing one block: every argument checked first, then the data arrays, then the completion mark.

A kill -9 at any moment loses at most the block being written: a torn data chunk (or shard) is
not yet marked complete, and a torn `complete` chunk fails its checksum and counts as "not
written". Rewriting a complete block first clears its mark. Sharded (spatial) arrays merge a
write with the stored shard, so the block's old shard is deleted before it is rewritten.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import FeatureValueError, StoreError
from .messages import MAX_LISTED, why
from .observers import notify_block_written
from .spec import SPATIAL_DTYPE

if TYPE_CHECKING:
    from .feature_store import FeatureStore

_CHECK_ELEMENTS = 1 << 24  # finite checks go through big blocks in slices of about this many values


def write_block(store: FeatureStore, start: int, features: Mapping[str, Any], *, views: Mapping[str, Any] | None,
                digests: Any, spatial: Mapping[str, Any] | None, spatial_views: Mapping[str, Any] | None) -> None:
    """See FeatureStore.write_block."""
    store.require_writable()
    layout = store.layout
    start = int(start)
    if not 0 <= start < layout.num_samples or start % layout.chunk_rows:
        raise StoreError(
            f"write_block(start={start}) on store {store.url}: a block must start at a multiple of "
            f"chunk_rows={layout.chunk_rows} below num_samples={layout.num_samples} (see FeatureStore.blocks())."
        )
    stop = min(start + layout.chunk_rows, layout.num_samples)
    n, k = stop - start, layout.views
    where = f"write_block rows {start}-{stop - 1} of store {store.url}"
    _same_layers(where, "features", features, list(layout.layers))
    if bool(k) != (views is not None) or (views is not None) != (digests is not None):
        raise StoreError(f"{where}: the store has {k} augmented views per row; pass views= and digests= "
                         "exactly when it has some.")
    _same_layers(where, "views", views, list(layout.layers) if k else [])
    _same_layers(where, "spatial", spatial, list(layout.spatial))
    _same_layers(where, "spatial_views", spatial_views, list(layout.spatial) if k else [])

    views, spatial, spatial_views = views or {}, spatial or {}, spatial_views or {}  # checked above
    out: dict[str, np.ndarray] = {}
    for name, spec in layout.layers.items():
        out[f"features/{spec.array_name}"] = _checked(store, name, start, features[name], (n, spec.dim), layout.dtype)
        if k:
            out[f"views/{spec.array_name}"] = _checked(store, name, start, views[name], (n, k, spec.dim), layout.dtype)
    if k:
        digests = np.asarray(digests, dtype=np.int64)
        if digests.shape != (n, k):
            raise StoreError(f"{where}: digests must have shape ({n}, {k}). Got {digests.shape}.")
        out["view_digests"] = digests
    for name, sspec in layout.spatial.items():
        out[f"spatial/{sspec.array_name}"] = _checked(store, name, start, spatial[name], (n, *sspec.shape), SPATIAL_DTYPE)
        if k:
            out[f"spatial_views/{sspec.array_name}"] = _checked(store, name, start, spatial_views[name],
                                                               (n, k, *sspec.shape), SPATIAL_DTYPE)

    # All checked: only now touch the store.
    arrays = store.arrays
    mask = arrays.get("complete")
    try:
        if _any_set_or_unreadable(mask, start, stop):
            mask[start:stop] = 0
        for path, value in out.items():
            if path.startswith("spatial"):
                arrays.drop_block(path, start)
            arrays.get(path)[start:stop] = value
        mask[start:stop] = 1
    except Exception as exc:
        full = any(getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) for e in (exc, exc.__cause__, exc.__context__))
        raise StoreError(
            f"writing rows {start}-{stop - 1} of store {store.url} failed ({why(exc)}): "
            + ("the disk is full: free space there, then run the same `bevcache extract` with --resume "
               "(finished rows are kept)." if full else
               "those rows stay marked not written; run `bevcache extract --resume` again.")
        ) from exc
    notify_block_written(store, start)


def _same_layers(where: str, what: str, given: Mapping[str, Any] | None, layers: list[str]) -> None:
    if not layers and not given:
        return
    names = list(given or {})
    missing = [n for n in layers if n not in names]
    extra = [n for n in names if n not in layers]
    if missing or extra:
        raise StoreError(f"{where}: {what} must have exactly the layers {layers}; missing {missing}, unexpected {extra}.")


def _any_set_or_unreadable(mask: Any, start: int, stop: int) -> bool:
    try:
        return bool(mask[start:stop].any())
    except Exception:  # a torn mark: cleared like a set one
        return True


def _checked(store: FeatureStore, layer: str, start: int, value: Any, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A block of one layer in the store's dtype, refused if mis-shaped or not finite."""
    if hasattr(value, "detach"):  # a torch tensor (torch itself is not imported by reading commands)
        value = value.detach().cpu().numpy()
    value = np.asarray(value)
    if value.shape != shape:
        raise StoreError(
            f"write_block rows {start}-{start + shape[0] - 1}, layer {layer!r} of store {store.url}: expected "
            f"shape {shape} (the block's rows x {_dims_text(shape)}). Got {value.shape}."
        )
    _check_finite(store, layer, start, value, "NaN/Inf")
    with np.errstate(over="ignore"):  # overflow to Inf is reported just below, by row
        cast = value.astype(dtype)
    _check_finite(store, layer, start, cast, f"values beyond the {dtype} range")
    return cast


def _dims_text(shape: tuple[int, ...]) -> str:
    return {2: "the layer's dim", 3: "views x the layer's dim", 4: "the map's C x h x w",
            5: "views x the map's C x h x w"}[len(shape)]


def _check_finite(store: FeatureStore, layer: str, start: int, value: np.ndarray, what: str) -> None:
    if value.dtype.kind != "f":
        if value.dtype.kind in "iub":
            return
        raise StoreError(f"layer {layer!r}: features must be a float array. Got dtype {value.dtype}.")
    flat = value.reshape(value.shape[0], -1)
    step = max(1, _CHECK_ELEMENTS // max(1, flat.shape[1]))
    bad = np.concatenate([np.flatnonzero(~np.isfinite(flat[s:s + step]).all(axis=1)) + s
                          for s in range(0, len(flat), step)] or [np.zeros(0, np.int64)])
    if bad.size == 0:
        return
    named = [f"{start + int(r)} (token {store.token_or_unknown(start + int(r))})" for r in bad[:MAX_LISTED]]
    more = f" and {bad.size - MAX_LISTED} more" if bad.size > MAX_LISTED else ""
    raise FeatureValueError(
        f"layer {layer!r} has {what} at dataset index {', '.join(named)}{more}; nothing of rows "
        f"{start}-{start + value.shape[0] - 1} was written to {store.url}. Check the teacher checkpoint and inputs."
    )
